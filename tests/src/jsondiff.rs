//! Structural JSON comparison that lists every difference with its path.

use serde_json::Value;

/// Every difference between `want` and `got`, as `path: want X, got Y` lines.
pub fn diff(want: &Value, got: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", want, got, &mut out);
    out
}

fn walk(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}/{k}");
                match g.get(k) {
                    Some(gv) => walk(&p, wv, gv, out),
                    None => out.push(format!("{p}: missing (want {wv})")),
                }
            }
            for (k, gv) in g {
                if !w.contains_key(k) {
                    out.push(format!("{path}/{k}: unexpected {gv}"));
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.len() != g.len() {
                let names = |a: &Vec<Value>| {
                    a.iter()
                        .map(|v| {
                            v.get("name")
                                .map(|n| n.to_string())
                                .unwrap_or_else(|| "?".into())
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                };
                out.push(format!(
                    "{path}: length {} vs {} (want [{}], got [{}])",
                    w.len(),
                    g.len(),
                    names(w),
                    names(g)
                ));
            }
            for (i, (wv, gv)) in w.iter().zip(g.iter()).enumerate() {
                walk(&format!("{path}/{i}"), wv, gv, out);
            }
        }
        _ if want != got => out.push(format!("{path}: want {want}, got {got}")),
        _ => {}
    }
}
