//! Kubernetes label selectors (`matchLabels` + `matchExpressions`), evaluated exactly as the API
//! server does for a MutatingWebhookConfiguration's `namespaceSelector`/`objectSelector`, and as
//! istiod does for `neverInjectSelector`/`alwaysInjectSelector`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `metav1.LabelSelectorRequirement`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// `metav1.LabelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// A selector that cannot be evaluated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("label selector operator {0:?} is not one of In, NotIn, Exists, DoesNotExist")]
    Operator(String),
    #[error("label selector operator {op} on key {key:?} {reason}")]
    Values {
        op: String,
        key: String,
        reason: &'static str,
    },
}

impl Requirement {
    fn validate(&self) -> Result<(), Error> {
        let needs_values = match self.operator.as_str() {
            "In" | "NotIn" => true,
            "Exists" | "DoesNotExist" => false,
            other => return Err(Error::Operator(other.to_owned())),
        };
        match (needs_values, self.values.is_empty()) {
            (true, true) => Err(Error::Values {
                op: self.operator.clone(),
                key: self.key.clone(),
                reason: "needs at least one value",
            }),
            (false, false) => Err(Error::Values {
                op: self.operator.clone(),
                key: self.key.clone(),
                reason: "takes no values",
            }),
            _ => Ok(()),
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.operator.as_str() {
            "In" => v.is_some_and(|v| self.values.contains(v)),
            // NotIn also matches when the key is absent (Kubernetes semantics).
            "NotIn" => v.is_none_or(|v| !self.values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    }
}

impl LabelSelector {
    /// No requirement at all. The API server treats an empty selector as "everything"; istiod's
    /// never/always selectors skip empty ones.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn validate(&self) -> Result<(), Error> {
        self.match_expressions
            .iter()
            .try_for_each(Requirement::validate)
    }

    /// All requirements hold (an empty selector matches everything).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> Result<bool, Error> {
        self.validate()?;
        Ok(self
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels)))
    }
}

impl LabelSelector {
    /// The first requirement the labels fail, in words; `None` when the selector matches.
    pub fn why_not(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        for (k, v) in &self.match_labels {
            if labels.get(k) != Some(v) {
                return Some(format!("needs label {k}={v}"));
            }
        }
        for r in &self.match_expressions {
            if !r.matches(labels) {
                let have = labels
                    .get(&r.key)
                    .map(|v| format!("it is {v:?}"))
                    .unwrap_or_else(|| "it is absent".into());
                return Some(match r.operator.as_str() {
                    "In" => format!("needs label {} in ({}), {have}", r.key, r.values.join(",")),
                    "NotIn" => format!(
                        "needs label {} not in ({}), {have}",
                        r.key,
                        r.values.join(",")
                    ),
                    "Exists" => format!("needs label {} to exist", r.key),
                    "DoesNotExist" => format!("needs label {} to be absent, {have}", r.key),
                    other => format!("operator {other} is invalid"),
                });
            }
        }
        None
    }
}

impl std::fmt::Display for LabelSelector {
    /// The `kubectl` selector syntax (`a=b,c in (d,e),!f`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator.as_str() {
                "In" => format!("{} in ({})", r.key, r.values.join(",")),
                "NotIn" => format!("{} notin ({})", r.key, r.values.join(",")),
                "Exists" => r.key.clone(),
                "DoesNotExist" => format!("!{}", r.key),
                other => format!("{} {other} ({})", r.key, r.values.join(",")),
            });
        }
        if parts.is_empty() {
            f.write_str("<everything>")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}
