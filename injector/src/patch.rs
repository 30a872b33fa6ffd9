//! The RFC 6902 patch a webhook returns. Both sides of the diff come from the typed model, so a
//! field k8s-openapi does not know (a newer Kubernetes' addition) is never deleted: such fields are
//! found by comparing the raw request object with its typed reading, and carried over onto the
//! typed result (by container/volume name inside lists, so they follow their owner when the
//! injected containers shift positions) before the diff is taken.

use serde_json::{Map, Value};

/// What `raw` has that `typed` does not: unknown fields only, recursively. Lists of named
/// objects are matched by `name`, other lists by position.
fn unknown(raw: &Value, typed: &Value) -> Option<Value> {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            let mut out = Map::new();
            for (k, rv) in r {
                match t.get(k) {
                    None if !rv.is_null() => {
                        out.insert(k.clone(), rv.clone());
                    }
                    None => {}
                    Some(tv) => {
                        if let Some(u) = unknown(rv, tv) {
                            out.insert(k.clone(), u);
                        }
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        (Value::Array(r), Value::Array(t)) => {
            let named = r.iter().all(|v| v.get("name").is_some());
            let mut out = Map::new();
            for (i, rv) in r.iter().enumerate() {
                let tv = if named {
                    t.iter().find(|x| x.get("name") == rv.get("name"))
                } else {
                    t.get(i)
                };
                if let Some(u) = tv.and_then(|tv| unknown(rv, tv)) {
                    let key = if named {
                        format!("name:{}", rv["name"].as_str().unwrap_or_default())
                    } else {
                        format!("index:{i}")
                    };
                    out.insert(key, u);
                }
            }
            (!out.is_empty()).then_some(Value::Array(vec![Value::Object(out)]))
        }
        _ => None,
    }
}

/// Put the unknown fields back onto `after`.
fn reattach(after: &mut Value, extra: &Value) {
    match (after, extra) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                match a.get_mut(k) {
                    Some(av) => reattach(av, ev),
                    None => {
                        a.insert(k.clone(), ev.clone());
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(e)) => {
            let Some(Value::Object(map)) = e.first() else {
                return;
            };
            for (key, ev) in map {
                let target = if let Some(name) = key.strip_prefix("name:") {
                    a.iter_mut()
                        .find(|x| x.get("name").and_then(Value::as_str) == Some(name))
                } else {
                    key.strip_prefix("index:")
                        .and_then(|i| i.parse::<usize>().ok())
                        .and_then(|i| a.get_mut(i))
                };
                if let Some(t) = target {
                    reattach(t, ev);
                }
            }
        }
        _ => {}
    }
}

/// The patch that turns the request's raw object into `after` without losing unknown fields.
/// `typed_before` is the raw object as the typed model read it.
pub fn create(raw: &Value, typed_before: &Value, after: &Value) -> json_patch::Patch {
    let mut after = after.clone();
    if let Some(extra) = unknown(raw, typed_before) {
        reattach(&mut after, &extra);
    }
    json_patch::diff(raw, &after)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_fields_survive_and_follow_their_container() {
        let raw = json!({"spec": {"futureField": 1, "initContainers": [{"name": "user-init", "image": "i", "futureContainerField": "x"}]}});
        let typed_before =
            json!({"spec": {"initContainers": [{"name": "user-init", "image": "i"}]}});
        // Injection puts two containers in front of the user's init container.
        let after = json!({"spec": {"initContainers": [{"name": "istio-init"}, {"name": "istio-proxy"}, {"name": "user-init", "image": "i"}]}});
        let patch = create(&raw, &typed_before, &after);
        let mut doc = raw.clone();
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        assert_eq!(doc["spec"]["futureField"], 1);
        assert_eq!(
            doc["spec"]["initContainers"][2]["futureContainerField"],
            "x"
        );
        assert!(
            doc["spec"]["initContainers"][0]
                .get("futureContainerField")
                .is_none()
        );
    }
}
