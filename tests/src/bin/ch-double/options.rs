//! CH's option-string parser: `key=value` items split on commas outside quotes and
//! brackets, keys checked against the option's known ones, and CH's value syntaxes.

/// CH's `split_commas`: commas split items only outside `"..."` and `[...]`.
pub fn split_commas(s: &str) -> Result<Vec<String>, String> {
    let mut list = Vec::new();
    let (mut depth, mut quoted, mut cur) = (0u32, false, String::new());
    for c in s.trim().chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or_else(|| format!("invalid syntax: {s}"))?,
            ',' if depth == 0 => {
                list.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    list.push(cur);
    if quoted || depth != 0 {
        return Err(format!("invalid syntax: {s}"));
    }
    Ok(list)
}

/// Items as (key, value): each split once on its first `=`, the value trimmed.
pub fn split_options(s: &str) -> Result<Vec<(String, Option<String>)>, String> {
    Ok(split_commas(s)?
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.trim().to_string())),
            None => (item, None),
        })
        .collect())
}

/// `split_options`, refusing keys outside `known` the way CH does.
pub fn options(s: &str, known: &[&str]) -> Result<Vec<(String, Option<String>)>, String> {
    let o = split_options(s)?;
    for (k, _) in &o {
        if !known.contains(&k.as_str()) {
            return Err(format!("unknown option: {k}"));
        }
    }
    Ok(o)
}

/// The value of `key`, dequoted; None when absent or empty (`key=`), as CH's `get`.
pub fn lookup(o: &[(String, Option<String>)], key: &str) -> Option<String> {
    let v = o.iter().rev().find(|(k, _)| k == key)?.1.clone()?;
    if v.is_empty() {
        return None;
    }
    Some(dequote(&v))
}

fn dequote(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '"' {
            if quoted && chars.peek() == Some(&'"') {
                out.push('"');
                chars.next();
            } else {
                quoted = !quoted;
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn toggle(o: &[(String, Option<String>)], key: &str) -> Result<bool, String> {
    match o.iter().rev().find(|(k, _)| k == key) {
        None => Ok(false),
        Some((_, v)) => match v.as_deref().unwrap_or("").to_ascii_lowercase().as_str() {
            "" | "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            other => Err(format!("Error parsing toggle: {other}")),
        },
    }
}

/// `3`, `[3]`, `[3,4]`, `[3-5]`.
pub fn integer_list(s: &str) -> Result<Vec<i32>, String> {
    let mut out = Vec::new();
    for item in s.trim().trim_matches(|c| c == '[' || c == ']').split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<i32>(), b.parse::<i32>());
                let (Ok(a), Ok(b)) = (a, b) else { return Err(format!("invalid integer list: {s}")) };
                out.extend(a..=b);
            }
            None => out.push(item.parse::<i32>().map_err(|_| format!("invalid integer list: {s}"))?),
        }
    }
    Ok(out)
}

/// CH's ByteSized: K/M/G suffixes are binary shifts, a bare number is bytes.
pub fn byte_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid byte size: {s}"))?;
    n.checked_shl(shift).ok_or_else(|| format!("invalid byte size: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_outside_brackets() {
        assert_eq!(split_commas("fd=[3,4],mac=a").unwrap(), vec!["fd=[3,4]", "mac=a"]);
        assert!(split_commas("fd=[3").is_err());
        assert_eq!(integer_list("[3-5]").unwrap(), vec![3, 4, 5]);
        assert_eq!(byte_size("64M").unwrap(), 64 << 20);
    }
}
