//! Whether a pod gets a sidecar: Istio's `injectRequired`, in Istio's order, returning the rule
//! that decided so that every decision can be explained (`ferry-injector explain`, the skip log,
//! the status annotation).

use std::collections::BTreeMap;
use std::fmt;

use crate::config::Policy;
use crate::selector::LabelSelector;

/// `sidecar.istio.io/inject`, as a pod label (preferred, usable by the webhook's objectSelector)
/// or annotation (deprecated, still honoured).
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";

/// Namespaces whose pods are never injected, whatever they say (Istio's list).
pub const IGNORED_NAMESPACES: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

/// The parts of a pod the decision reads.
#[derive(Clone, Debug)]
pub struct PodFacts<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub host_network: bool,
}

/// The decision inputs that come from the injector's configuration.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    pub policy: Policy,
    pub never_inject_selector: &'a [LabelSelector],
    pub always_inject_selector: &'a [LabelSelector],
}

/// Where an explicit `sidecar.istio.io/inject` value was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Label,
    Annotation,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Label => "label",
            Source::Annotation => "annotation",
        })
    }
}

/// The rule that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    HostNetwork,
    IgnoredNamespace(String),
    Explicit {
        source: Source,
        value: String,
    },
    NeverSelector {
        index: usize,
        selector: String,
    },
    AlwaysSelector {
        index: usize,
        selector: String,
    },
    Policy {
        policy: Policy,
        ignored_value: Option<(Source, String)>,
    },
}

/// The decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub inject: bool,
    pub reason: Reason,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::HostNetwork => {
                f.write_str("the pod uses hostNetwork: such pods are never injected")
            }
            Reason::IgnoredNamespace(ns) => write!(
                f,
                "namespace {ns:?} is a Kubernetes system namespace: never injected"
            ),
            Reason::Explicit { source, value } => write!(f, "pod {source} {INJECT_KEY}={value:?}"),
            Reason::NeverSelector { index, selector } => {
                write!(
                    f,
                    "pod labels match neverInjectSelector[{index}] ({selector})"
                )
            }
            Reason::AlwaysSelector { index, selector } => {
                write!(
                    f,
                    "pod labels match alwaysInjectSelector[{index}] ({selector})"
                )
            }
            Reason::Policy {
                policy,
                ignored_value,
            } => {
                write!(
                    f,
                    "no explicit choice on the pod; injection policy is {policy}"
                )?;
                if let Some((source, v)) = ignored_value {
                    write!(
                        f,
                        " (pod {source} {INJECT_KEY}={v:?} ignored: only \"true\" and \"false\" count)"
                    )?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.inject { "inject" } else { "skip" };
        write!(f, "{verdict}: {}", self.reason)
    }
}

/// Istio's `injectRequired`: hostNetwork, system namespaces, the label (over the annotation),
/// never then always selectors, then the policy.
pub fn inject_required(pod: &PodFacts<'_>, rules: &Rules<'_>) -> Decision {
    let decide = |inject, reason| Decision { inject, reason };
    if pod.host_network {
        return decide(false, Reason::HostNetwork);
    }
    if IGNORED_NAMESPACES.contains(&pod.namespace) {
        return decide(false, Reason::IgnoredNamespace(pod.namespace.to_owned()));
    }
    // The label wins whenever its key is present, even with an empty value. Only the exact
    // strings "true" and "false" count (Istio: `TRUE`, `yes`, `on` are ignored).
    let explicit = match pod.labels.get(INJECT_KEY) {
        Some(v) => Some((Source::Label, v.clone())),
        None => pod
            .annotations
            .get(INJECT_KEY)
            .map(|v| (Source::Annotation, v.clone())),
    };
    let mut ignored_value = None;
    if let Some((source, value)) = explicit {
        match value.as_str() {
            "true" => return decide(true, Reason::Explicit { source, value }),
            "false" => return decide(false, Reason::Explicit { source, value }),
            "" => {}
            _ => ignored_value = Some((source, value)),
        }
    }
    let matching = |selectors: &[LabelSelector]| {
        selectors
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_empty() && s.matches(pod.labels).unwrap_or(false))
            .map(|(i, s)| (i, s.to_string()))
    };
    if let Some((index, selector)) = matching(rules.never_inject_selector) {
        return decide(false, Reason::NeverSelector { index, selector });
    }
    if let Some((index, selector)) = matching(rules.always_inject_selector) {
        return decide(true, Reason::AlwaysSelector { index, selector });
    }
    let inject = rules.policy == Policy::Enabled;
    decide(
        inject,
        Reason::Policy {
            policy: rules.policy,
            ignored_value,
        },
    )
}
