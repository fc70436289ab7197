//! A small JSON Schema (2020-12) validator for the keywords the API's schemas use. A keyword
//! it does not know fails the test, so a schema is never half-checked.

#![allow(dead_code)]

use serde_json::{Map, Value};

/// Keywords that only describe.
const ANNOTATIONS: &[&str] = &["description", "default", "title", "format", "examples"];

/// Whether `value` matches `schema`; the first mismatch otherwise, with its path.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "$")
}

fn check(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let obj = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: nothing is allowed here")),
        Value::Object(o) => o,
        other => panic!("{at}: not a schema: {other}"),
    };
    for (key, kw) in obj {
        if ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        keyword(obj, key, kw, value, at)?;
    }
    Ok(())
}

fn fail(at: &str, what: impl std::fmt::Display) -> Result<(), String> {
    Err(format!("{at}: {what}"))
}

fn keyword(obj: &Map<String, Value>, key: &str, kw: &Value, value: &Value, at: &str) -> Result<(), String> {
    let n = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("{at}: {key} is not a number"));
    let len = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("{at}: {key} is not a count")) as usize;
    match key {
        "type" => {
            let types: Vec<&str> = match kw {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().map(|t| t.as_str().expect("type name")).collect(),
                _ => panic!("{at}: bad type keyword {kw}"),
            };
            if !types.iter().any(|t| has_type(value, t)) {
                return fail(at, format!("{value} is not of type {kw}"));
            }
        }
        "enum" => {
            if !kw.as_array().expect("enum array").contains(value) {
                return fail(at, format!("{value} is not one of {kw}"));
            }
        }
        "const" => {
            if kw != value {
                return fail(at, format!("{value} is not {kw}"));
            }
        }
        "properties" => {
            if let Value::Object(v) = value {
                for (name, sub) in kw.as_object().expect("properties object") {
                    if let Some(field) = v.get(name) {
                        check(sub, field, &format!("{at}.{name}"))?;
                    }
                }
            }
        }
        "required" => {
            if let Value::Object(v) = value {
                for name in kw.as_array().expect("required array") {
                    let name = name.as_str().expect("required name");
                    if !v.contains_key(name) {
                        return fail(at, format!("lacks required `{name}`"));
                    }
                }
            }
        }
        "additionalProperties" => {
            if let Value::Object(v) = value {
                let known = obj.get("properties").and_then(Value::as_object);
                for (name, field) in v {
                    if !known.is_some_and(|k| k.contains_key(name)) {
                        check(kw, field, &format!("{at}.{name}"))
                            .map_err(|e| format!("{e} (`{name}` is not a known property)"))?;
                    }
                }
            }
        }
        "propertyNames" => {
            if let Value::Object(v) = value {
                for name in v.keys() {
                    check(kw, &Value::from(name.as_str()), &format!("{at}.{name} (name)"))?;
                }
            }
        }
        "maxProperties" => {
            if value.as_object().is_some_and(|v| v.len() > len(kw)) {
                return fail(at, format!("more than {kw} properties"));
            }
        }
        "items" => {
            if let Value::Array(items) = value {
                for (i, item) in items.iter().enumerate() {
                    check(kw, item, &format!("{at}[{i}]"))?;
                }
            }
        }
        "minItems" | "maxItems" => {
            if let Value::Array(items) = value {
                let bad = if key == "minItems" { items.len() < len(kw) } else { items.len() > len(kw) };
                if bad {
                    return fail(at, format!("{} items breaks {key} {kw}", items.len()));
                }
            }
        }
        "minLength" | "maxLength" => {
            if let Value::String(s) = value {
                let chars = s.chars().count();
                let bad = if key == "minLength" { chars < len(kw) } else { chars > len(kw) };
                if bad {
                    return fail(at, format!("{chars} characters breaks {key} {kw}"));
                }
            }
        }
        "pattern" => {
            if let Value::String(s) = value {
                let re = regex::Regex::new(kw.as_str().expect("pattern string")).expect("pattern compiles");
                if !re.is_match(s) {
                    return fail(at, format!("{s:?} does not match {kw}"));
                }
            }
        }
        "minimum" | "maximum" => {
            if value.is_number() {
                let bad = if key == "minimum" { n(value) < n(kw) } else { n(value) > n(kw) };
                if bad {
                    return fail(at, format!("{value} breaks {key} {kw}"));
                }
            }
        }
        "anyOf" => {
            let subs = kw.as_array().expect("anyOf array");
            if !subs.iter().any(|s| check(s, value, at).is_ok()) {
                return fail(at, format!("{value} matches none of anyOf"));
            }
        }
        "oneOf" => {
            let subs = kw.as_array().expect("oneOf array");
            let matched = subs.iter().filter(|s| check(s, value, at).is_ok()).count();
            if matched != 1 {
                return fail(at, format!("{value} matches {matched} of oneOf"));
            }
        }
        other => panic!("{at}: the test validator does not know keyword `{other}`"),
    }
    Ok(())
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => panic!("unknown type {other}"),
    }
}

/// The method `name` of an OpenRPC document.
pub fn method<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["methods"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name}"))
}

/// A method's by-name params as one object schema, rebuilt from its OpenRPC content
/// descriptors. Unknown params are refused (docs/api.md), hence `additionalProperties`.
pub fn params_schema(doc: &Value, name: &str) -> Value {
    let params = method(doc, name)["params"].as_array().unwrap();
    let properties: serde_json::Map<String, Value> =
        params.iter().map(|p| (p["name"].as_str().unwrap().to_string(), p["schema"].clone())).collect();
    let required: Vec<&Value> = params.iter().filter(|p| p["required"] == true).map(|p| &p["name"]).collect();
    serde_json::json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// Self-checks of the validator, so the tests built on it can fail.
pub fn self_test() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 1, "maximum": 3},
            "b": {"type": ["string", "null"], "pattern": "^[a-z]{1,2}$", "maxLength": 2},
            "c": {"type": "array", "items": {"enum": ["x"]}, "minItems": 1},
        },
        "required": ["a"],
        "additionalProperties": false,
    });
    let good = [serde_json::json!({"a": 1}), serde_json::json!({"a": 3, "b": "ab", "c": ["x"]})];
    for v in good {
        assert_eq!(validate(&schema, &v), Ok(()), "{v}");
    }
    let bad = [
        serde_json::json!({}),
        serde_json::json!({"a": 0}),
        serde_json::json!({"a": 4}),
        serde_json::json!({"a": 1.5}),
        serde_json::json!({"a": 1, "b": "abc"}),
        serde_json::json!({"a": 1, "b": "A"}),
        serde_json::json!({"a": 1, "c": []}),
        serde_json::json!({"a": 1, "c": ["y"]}),
        serde_json::json!({"a": 1, "d": 1}),
        serde_json::json!([1]),
    ];
    for v in bad {
        assert!(validate(&schema, &v).is_err(), "{v} must be refused");
    }
}
