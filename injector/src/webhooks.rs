//! The MutatingWebhookConfiguration's selectors: which of Istio's webhooks the API server calls
//! for a pod, given its namespace's labels and its own labels. The chart renders exactly these;
//! the lab and `explain` evaluate them here.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::selector::{LabelSelector, Requirement};

/// One webhook entry (selectors only; the rest is fixed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub name: String,
    pub namespace_selector: LabelSelector,
    pub object_selector: LabelSelector,
}

fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
    Requirement {
        key: key.into(),
        operator: op.into(),
        values: values.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn sel(reqs: Vec<Requirement>) -> LabelSelector {
    LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: reqs,
    }
}

/// Istio's webhooks for a revision (`""` is the default revision). The default revision also
/// serves the `istio-injection` label; `enable_namespaces_by_default` adds the `auto` webhook.
pub fn istio_webhooks(revision: &str, enable_namespaces_by_default: bool) -> Vec<Webhook> {
    let rev = if revision.is_empty() {
        "default"
    } else {
        revision
    };
    let not_false = req("sidecar.istio.io/inject", "NotIn", &["false"]);
    let mut hooks = vec![
        Webhook {
            name: "rev.namespace.sidecar-injector.istio.io".into(),
            namespace_selector: sel(vec![
                req("istio.io/rev", "In", &[rev]),
                req("istio-injection", "DoesNotExist", &[]),
            ]),
            object_selector: sel(vec![not_false.clone()]),
        },
        Webhook {
            name: "rev.object.sidecar-injector.istio.io".into(),
            namespace_selector: sel(vec![
                req("istio.io/rev", "DoesNotExist", &[]),
                req("istio-injection", "DoesNotExist", &[]),
            ]),
            object_selector: sel(vec![not_false.clone(), req("istio.io/rev", "In", &[rev])]),
        },
    ];
    if revision.is_empty() {
        hooks.push(Webhook {
            name: "namespace.sidecar-injector.istio.io".into(),
            namespace_selector: sel(vec![req("istio-injection", "In", &["enabled"])]),
            object_selector: sel(vec![not_false]),
        });
        hooks.push(Webhook {
            name: "object.sidecar-injector.istio.io".into(),
            namespace_selector: sel(vec![
                req("istio-injection", "DoesNotExist", &[]),
                req("istio.io/rev", "DoesNotExist", &[]),
            ]),
            object_selector: sel(vec![
                req("sidecar.istio.io/inject", "In", &["true"]),
                req("istio.io/rev", "DoesNotExist", &[]),
            ]),
        });
        if enable_namespaces_by_default {
            hooks.push(Webhook {
                name: "auto.sidecar-injector.istio.io".into(),
                namespace_selector: sel(vec![
                    req("istio-injection", "DoesNotExist", &[]),
                    req("istio.io/rev", "DoesNotExist", &[]),
                    req(
                        "kubernetes.io/metadata.name",
                        "NotIn",
                        crate::decision::IGNORED_NAMESPACES,
                    ),
                ]),
                object_selector: sel(vec![
                    req("sidecar.istio.io/inject", "DoesNotExist", &[]),
                    req("istio.io/rev", "DoesNotExist", &[]),
                ]),
            });
        }
    }
    hooks
}

/// Names of the webhooks the API server would call for this pod.
pub fn matching<'w>(
    hooks: &'w [Webhook],
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Vec<&'w str> {
    hooks
        .iter()
        .filter(|h| {
            h.namespace_selector
                .matches(namespace_labels)
                .unwrap_or(false)
                && h.object_selector.matches(pod_labels).unwrap_or(false)
        })
        .map(|h| h.name.as_str())
        .collect()
}
