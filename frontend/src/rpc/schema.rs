//! `rpc.discover`: the OpenRPC 1.3 document for [`API`], whose params and result schemas are
//! derived from the Rust types the server parses and serializes ([`super::params`],
//! [`super::results`]), so the description cannot drift from the behaviour.

use schemars::generate::{Contract, SchemaSettings};
use schemars::transform::{RecursiveTransform, RestrictFormats, Transform};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde_json::Value;

use super::api::{API, MethodDef};
use super::errors;

/// The OpenRPC version the document follows.
pub const OPENRPC_VERSION: &str = "1.3.2";

/// How the schemas are generated: JSON Schema 2020-12, every subschema inline (so each
/// schema stands alone), params as they are parsed, results as they are serialized.
pub fn generator(contract: Contract) -> SchemaGenerator {
    SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
            s.contract = contract;
        })
        .into_generator()
}

/// The schema of `T`, in the API's dialect: no Rust-only `format`s, and a plain string enum
/// for enums whose variants are documented (schemars makes those a `oneOf` of consts).
pub fn schema_for<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<T>();
    let mut formats = RestrictFormats::default();
    formats.infer_from_meta_schema = false;
    formats.allowed_formats = ["date-time".into()].into();
    RecursiveTransform(formats).transform(&mut schema);
    RecursiveTransform(ConstsToEnum).transform(&mut schema);
    schema
}

/// Turns `{"oneOf": [{"type": "string", "const": "a", "description": "A."}, ...]}` into
/// `{"type": "string", "enum": ["a", ...]}`, the variants' descriptions kept in the schema's.
#[derive(Debug, Clone, Copy)]
struct ConstsToEnum;

impl Transform for ConstsToEnum {
    fn transform(&mut self, schema: &mut Schema) {
        let Some(Value::Array(variants)) = schema.get("oneOf") else {
            return;
        };
        let mut values = Vec::new();
        let mut described = Vec::new();
        for v in variants {
            let is_string = v.get("type") == Some(&Value::from("string"));
            match (v.get("const"), v.get("enum")) {
                (Some(Value::String(c)), None) if is_string => {
                    if let Some(d) = v.get("description").and_then(Value::as_str) {
                        described.push(format!("`{c}`: {d}"));
                    }
                    values.push(Value::from(c.as_str()));
                }
                (None, Some(Value::Array(e))) if is_string && e.iter().all(Value::is_string) => {
                    values.extend(e.iter().cloned());
                }
                _ => return,
            }
        }
        schema.remove("oneOf");
        schema.insert("type".into(), "string".into());
        schema.insert("enum".into(), Value::Array(values));
        if !described.is_empty() {
            let head = schema.get("description").and_then(Value::as_str).unwrap_or_default();
            let text = [head.to_string()].into_iter().chain(described).filter(|l| !l.is_empty()).collect::<Vec<_>>();
            schema.insert("description".into(), text.join("\n").into());
        }
    }
}

/// An OpenRPC 1.3 document (the parts this API uses).
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct OpenRpcDocument {
    pub openrpc: String,
    pub info: Info,
    pub methods: Vec<MethodObject>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Info {
    pub title: String,
    pub version: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct MethodObject {
    pub name: String,
    pub summary: String,
    pub param_structure: ParamStructure,
    pub params: Vec<ContentDescriptor>,
    pub result: ContentDescriptor,
    pub errors: Vec<ErrorObject>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ParamStructure {
    ByName,
    ByPosition,
}

/// One param, or the result: a name and a JSON Schema.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ContentDescriptor {
    pub name: String,
    pub required: bool,
    pub schema: Schema,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ErrorObject {
    pub code: i32,
    pub message: String,
}

/// The OpenRPC document for [`API`].
pub fn openrpc_document() -> OpenRpcDocument {
    let mut params = generator(Contract::Deserialize);
    let mut results = generator(Contract::Serialize);
    OpenRpcDocument {
        openrpc: OPENRPC_VERSION.to_string(),
        info: Info {
            title: "my_hypervisor".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            description: "VM lifecycle control over line-delimited JSON-RPC 2.0 on a Unix socket".to_string(),
        },
        methods: API.iter().map(|def| describe(def, &mut params, &mut results)).collect(),
    }
}

fn describe(def: &MethodDef, params: &mut SchemaGenerator, results: &mut SchemaGenerator) -> MethodObject {
    let object = (def.params)(params);
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let params = object
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .filter_map(|(name, schema)| {
                    Some(ContentDescriptor {
                        name: name.clone(),
                        required: required.contains(&name.as_str()),
                        schema: Schema::try_from(schema.clone()).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let errors = def
        .errors
        .iter()
        .map(|&code| {
            let name = errors::APPLICATION_CODES.iter().find(|(c, _)| *c == code).map_or("", |(_, n)| *n);
            ErrorObject { code, message: name.to_string() }
        })
        .collect();
    MethodObject {
        name: def.name.to_string(),
        summary: def.summary.to_string(),
        param_structure: if def.by_position { ParamStructure::ByPosition } else { ParamStructure::ByName },
        params,
        result: ContentDescriptor { name: "result".to_string(), required: true, schema: (def.result)(results) },
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_enum_variants_become_a_string_enum() {
        let mut g = generator(Contract::Serialize);
        let s = schema_for::<crate::vm::VmState>(&mut g);
        let values: Vec<&str> =
            s.get("enum").and_then(Value::as_array).unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(values.len(), crate::vm::VmState::ALL.len(), "{s:?}");
        assert!(s.get("oneOf").is_none(), "{s:?}");
        assert_eq!(values, crate::vm::VmState::ALL.map(|s| s.as_str()), "in declaration order");
        let text = s.get("description").and_then(Value::as_str).unwrap();
        assert!(text.contains("`start_failed`: A start failed"), "{text}");
        // A mixed oneOf is left alone.
        let mut mixed = schemars::json_schema!({"oneOf": [{"type": "string", "const": "a"}, {"type": "integer"}]});
        let before = mixed.clone();
        ConstsToEnum.transform(&mut mixed);
        assert_eq!(mixed, before);
    }

    #[test]
    fn no_rust_only_formats() {
        let doc = serde_json::to_string(&openrpc_document()).unwrap();
        for f in ["uint", "int32", "int64", "uint8"] {
            assert!(!doc.contains(&format!("\"format\":\"{f}")), "{f}");
        }
    }
}
