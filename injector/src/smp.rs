//! The part of Kubernetes' strategic merge patch the injector needs: merging a container the pod
//! already has under an injected name (a user override, or the previous injection's container) over
//! the freshly rendered one. Objects merge recursively, the patch's values win, keyed lists
//! (`env` by name, `volumeMounts` by mountPath, `ports` by containerPort, ...) merge item by item
//! and are ordered with Kubernetes' `mergeSortedSlice`, every other list is replaced.

use serde_json::{Map, Value};

/// The merge key of a container's list field, as in the Kubernetes API's patch strategy.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        "volumeDevices" => Some("devicePath"),
        "resizePolicy" => Some("resourceName"),
        _ => None,
    }
}

/// Merge `patch` over `base` (`base` plays the server's object, `patch` the patch).
pub fn merge(base: Value, patch: Value) -> Value {
    merge_field("", base, patch)
}

fn merge_field(field: &str, base: Value, patch: Value) -> Value {
    match (base, patch) {
        (Value::Object(mut b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    continue;
                }
                let merged = match b.remove(&k) {
                    Some(bv) => merge_field(&k, bv, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Object(b)
        }
        (Value::Array(b), Value::Array(p)) => match merge_key(field) {
            Some(key) => Value::Array(merge_keyed(b, p, key)),
            None => Value::Array(p),
        },
        (_, p) => p,
    }
}

fn key_of<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object().and_then(|m: &Map<String, Value>| m.get(key))
}

fn merge_keyed(server: Vec<Value>, patch: Vec<Value>, key: &str) -> Vec<Value> {
    let server_order: Vec<Option<Value>> = server.iter().map(|v| key_of(v, key).cloned()).collect();
    let patch_keys: Vec<Option<&Value>> = patch.iter().map(|v| key_of(v, key)).collect();
    let mut server_only = Vec::new();
    let mut server_items = Vec::new();
    for item in server {
        let k = key_of(&item, key).cloned();
        if k.is_some() && patch_keys.contains(&k.as_ref()) {
            server_items.push(item);
        } else {
            server_only.push(item);
        }
    }
    let merged_patch: Vec<Value> = patch
        .into_iter()
        .map(|p| {
            let k = key_of(&p, key).cloned();
            match server_items
                .iter()
                .position(|s| k.is_some() && key_of(s, key) == k.as_ref())
            {
                Some(i) => merge_field("", server_items.remove(i), p),
                None => p,
            }
        })
        .collect();
    merge_sorted(server_only, merged_patch, &server_order, key)
}

/// Kubernetes' `mergeSortedSlice`: interleave server-only items into the patch's items, a
/// server-only item going first when the server had it before the patch item.
fn merge_sorted(
    left: Vec<Value>,
    right: Vec<Value>,
    server_order: &[Option<Value>],
    key: &str,
) -> Vec<Value> {
    let index = |v: &Value| {
        server_order
            .iter()
            .position(|k| k.is_some() && k.as_ref() == key_of(v, key))
    };
    let (mut l, mut r) = (left.into_iter().peekable(), right.into_iter().peekable());
    let mut out = Vec::new();
    loop {
        match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some(_), None) => out.extend(l.next()),
            (None, Some(_)) => out.extend(r.next()),
            (Some(a), Some(b)) => {
                let left_first = matches!((index(a), index(b)), (Some(i), Some(j)) if i < j);
                if left_first {
                    out.extend(l.next());
                } else {
                    out.extend(r.next());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge;

    #[test]
    fn env_interleaves_like_kubernetes() {
        let base = json!({"env": [{"name": "A"}, {"name": "B"}, {"name": "NEW", "value": "n"}, {"name": "C", "value": "new"}]});
        let patch = json!({"env": [{"name": "OLD"}, {"name": "A"}, {"name": "B"}, {"name": "C", "value": "old"}]});
        let got = merge(base, patch);
        let names: Vec<&str> = got["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["OLD", "A", "B", "NEW", "C"]);
        assert_eq!(got["env"][4]["value"], "old", "patch values win");
    }

    #[test]
    fn objects_merge_and_plain_lists_are_replaced() {
        let got = merge(
            json!({"args": ["a", "b"], "lifecycle": {"preStop": {"x": 1}}, "image": "ours"}),
            json!({"args": ["c"], "lifecycle": {"postStart": {"y": 2}}, "image": null}),
        );
        assert_eq!(
            got,
            json!({"args": ["c"], "lifecycle": {"preStop": {"x": 1}, "postStart": {"y": 2}}, "image": "ours"})
        );
    }
}
