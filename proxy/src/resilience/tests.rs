use super::*;
use serde_json::json;

#[test]
fn durations() {
    assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("5 parsecs").is_err());
}

#[test]
fn retry_on_conditions() {
    let r =
        RetryOn::parse("5xx,gateway-error, connect-failure,retriable-status-codes,409,unavailable")
            .expect("parse");
    assert!(r.five_xx && r.gateway_error && r.connect_failure);
    assert_eq!(r.status_codes, [409]);
    assert_eq!(r.grpc, [14]);
    assert!(
        RetryOn::parse("sometimes")
            .unwrap_err()
            .contains("sometimes")
    );
}

#[test]
fn never_replays_a_non_idempotent_request_the_upstream_may_have_seen() {
    let r = Retries::parse(
        Some(&json!({"attempts": 3, "retryOn": "5xx,reset,connect-failure"})),
        false,
    )
    .expect("retries");
    let post = idempotent("POST", false);
    assert!(!post);
    assert_eq!(should_retry(&r, Outcome::Response(503, None), post), None);
    assert_eq!(should_retry(&r, Outcome::Reset, post), None);
    assert_eq!(
        should_retry(&r, Outcome::ConnectFailure, post),
        Some("connect-failure")
    );
    assert_eq!(
        should_retry(&r, Outcome::Response(503, None), true),
        Some("5xx")
    );
    assert_eq!(should_retry(&r, Outcome::Response(404, None), true), None);
    assert!(idempotent("POST", true), "an Idempotency-Key makes it safe");
    let opted_in =
        Retries::parse(Some(&json!({"attempts": 3, "retryOn": "5xx"})), true).expect("retries");
    assert_eq!(
        should_retry(&opted_in, Outcome::Response(500, None), post),
        Some("5xx")
    );
}

#[test]
fn istio_default_retries_connect_failures_and_503_only() {
    let d = Retries::parse(None, false).expect("default");
    assert_eq!(d.attempts, 2);
    assert_eq!(
        should_retry(&d, Outcome::Response(503, None), true),
        Some("retriable-status-codes")
    );
    assert_eq!(should_retry(&d, Outcome::Response(500, None), true), None);
    assert_eq!(
        should_retry(&d, Outcome::Response(200, Some(14)), true),
        Some("grpc-status")
    );
    let off = Retries::parse(Some(&json!({"attempts": 0})), false).expect("off");
    assert_eq!(off.attempts, 0);
}

#[test]
fn backoff_is_jittered_and_capped() {
    for retry in 0..10 {
        for r in [0u32, 7, 1000, u32::MAX] {
            let b = backoff(retry, r);
            assert!(b <= Duration::from_millis(250));
            assert!(b <= Duration::from_millis(25 << retry.min(4)));
        }
    }
}

#[test]
fn client_overrides() {
    let h = |k: &str| match k {
        "x-envoy-upstream-rq-timeout-ms" => Some("150".to_owned()),
        "x-envoy-max-retries" => Some("5".to_owned()),
        "x-envoy-retry-on" => Some("5xx".to_owned()),
        _ => None,
    };
    let (t, r) = with_overrides(Some(Duration::from_secs(10)), Retries::istio_default(), &h);
    assert_eq!(t, Some(Duration::from_millis(150)));
    assert_eq!(r.attempts, 5);
    assert!(r.on.five_xx && !r.on.connect_failure);
    let (t, _) = with_overrides(
        Some(Duration::from_secs(10)),
        Retries::istio_default(),
        &|_| None,
    );
    assert_eq!(t, Some(Duration::from_secs(10)));
}

#[test]
fn faults() {
    let f = Fault::parse(&json!({"delay": {"fixedDelay": "7s", "percentage": {"value": 100.0}}, "abort": {"httpStatus": 500, "percentage": {"value": 10}}})).expect("fault");
    assert_eq!(f.delay, Some((Duration::from_secs(7), 100.0)));
    assert_eq!(f.abort, Some((Abort::Http(500), 10.0)));
    let g = Fault::parse(&json!({"abort": {"grpcStatus": "UNAVAILABLE"}})).expect("grpc");
    assert_eq!(
        g.abort,
        Some((Abort::Grpc("UNAVAILABLE".into(), 14), 100.0))
    );
    assert!(Fault::parse(&json!({"abort": {"httpStatus": 99}})).is_err());
    assert!(
        Fault::parse(&json!({"delay": {"percentage": {"value": 5}}}))
            .unwrap_err()
            .contains("fixedDelay")
    );
    assert!(
        Fault::parse(&json!({"abort": {"httpStatus": 503, "percentage": {"value": 150}}})).is_err()
    );
    // 10% of a uniform roll.
    let hit = (0..100_000u32).filter(|i| hits(10.0, i * 10)).count();
    assert_eq!(hit, 10_000);
    assert!(!hits(0.0, 0));
    assert!(hits(100.0, 999_999));
}

#[test]
fn route_policy_parse() {
    let p = RoutePolicy::parse(
        &json!({"timeout": "0.5s", "retries": {"attempts": 3, "perTryTimeout": "100ms"}}),
        false,
    )
    .expect("policy");
    assert_eq!(p.timeout, Some(Duration::from_millis(500)));
    assert_eq!(p.retries.per_try_timeout, Some(Duration::from_millis(100)));
    assert!(
        RoutePolicy::parse(&json!({"timeout": "fast"}), false)
            .unwrap_err()
            .contains("timeout")
    );
}

#[test]
fn pool_and_outlier_settings() {
    let l = PoolLimits::parse(&json!({"tcp": {"maxConnections": 1, "connectTimeout": "30ms"}, "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}})).expect("pool");
    assert_eq!(l.max_connections, Some(1));
    assert_eq!(l.max_pending, Some(1));
    assert_eq!(l.connect_timeout, Some(Duration::from_millis(30)));
    assert_eq!(
        l.connection_settings(),
        Some((Some(Duration::from_millis(30)), None, None))
    );
    let k = PoolLimits::parse(&json!({"tcp": {"tcpKeepalive": {"time": "60s"}}, "http": {"h2UpgradePolicy": "UPGRADE", "idleTimeout": "5s"}})).expect("pool");
    assert_eq!(
        (k.tcp_keepalive, k.idle_timeout, k.h2_upgrade),
        (
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(5)),
            true
        )
    );
    assert!(PoolLimits::parse(&json!({"http": {"h2UpgradePolicy": "SOMETIMES"}})).is_err());
    assert_eq!(PoolLimits::default().connection_settings(), None);
    assert!(
        PoolLimits::parse(&json!({"tcp": {"maxConnections": -1}}))
            .unwrap_err()
            .contains("connectionPool.tcp.maxConnections")
    );
    let o = OutlierPolicy::parse(&json!({"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "3m", "maxEjectionPercent": 100})).expect("outlier");
    assert_eq!(
        (o.consecutive_5xx, o.base_ejection, o.max_ejection_percent),
        (1, Duration::from_secs(180), 100)
    );
    let d = OutlierPolicy::parse(&json!({})).expect("defaults");
    assert_eq!(
        (d.consecutive_5xx, d.max_ejection_percent, d.base_ejection),
        (5, 10, Duration::from_secs(30))
    );
    assert!(OutlierPolicy::parse(&json!({"maxEjectionPercent": 101})).is_err());
}

#[tokio::test]
async fn breaker_admits_one_queues_one_rejects_the_rest_fast() {
    let b = Arc::new(Breakers::default());
    let limits = PoolLimits {
        max_connections: Some(1),
        max_pending: Some(1),
        ..PoolLimits::default()
    };
    let first = b.admit(1, &limits).await.expect("first");
    let b2 = b.clone();
    let l2 = limits.clone();
    let queued = tokio::spawn(async move { b2.admit(1, &l2).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let third = tokio::time::timeout(Duration::from_millis(100), b.admit(1, &limits)).await;
    assert!(
        matches!(third, Ok(Err(Overflow("http1MaxPendingRequests")))),
        "rejected at once"
    );
    drop(first);
    assert!(
        queued.await.expect("join").is_ok(),
        "the queued one gets the connection"
    );
    // http2MaxRequests caps requests in flight.
    let h2 = PoolLimits {
        max_requests: Some(1),
        ..PoolLimits::default()
    };
    let a = b.admit(2, &h2).await.expect("a");
    assert_eq!(
        b.admit(2, &h2).await.err(),
        Some(Overflow("http2MaxRequests"))
    );
    drop(a);
    assert!(b.admit(2, &h2).await.is_ok());
}

#[tokio::test]
async fn retry_budget_bounds_retries_in_flight() {
    let b = Breakers::default();
    let unlimited = PoolLimits::default();
    let a = b.admit(1, &unlimited).await.expect("admit");
    let slots: Vec<RetrySlot> = (0..10).filter_map(|_| a.retry_slot()).collect();
    assert_eq!(slots.len(), 3, "at least 3, else 20% of in-flight");
    drop(slots);
    let capped = PoolLimits {
        max_retries: Some(1),
        ..PoolLimits::default()
    };
    let c = b.admit(3, &capped).await.expect("admit");
    let s1 = c.retry_slot();
    assert!(s1.is_some() && c.retry_slot().is_none(), "maxRetries");
}

#[test]
fn outliers_eject_restore_cap_and_panic() {
    let o = Outliers::default();
    let p = OutlierPolicy::parse(
        &json!({"consecutive5xxErrors": 2, "baseEjectionTime": "10s", "maxEjectionPercent": 50}),
    )
    .expect("policy");
    let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
    let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
    let all = [a, b];
    let t0 = Instant::now();
    assert!(!o.record(&p, a, Outcome::Response(503, None), &all, t0));
    assert!(
        !o.record(&p, a, Outcome::Response(200, None), &all, t0),
        "a success resets the count"
    );
    assert!(!o.record(&p, a, Outcome::Response(503, None), &all, t0));
    assert!(
        o.record(&p, a, Outcome::Response(500, None), &all, t0),
        "second consecutive 5xx ejects"
    );
    assert_eq!(o.available(Some(&p), &all, t0), [b]);
    // The cap: b cannot be ejected too while a is out (50% already ejected).
    o.record(&p, b, Outcome::Response(503, None), &all, t0);
    assert!(!o.record(&p, b, Outcome::Response(503, None), &all, t0));
    // Back after the ejection time; a second ejection lasts twice as long.
    let later = t0 + Duration::from_secs(11);
    assert_eq!(o.available(Some(&p), &all, later), all);
    o.record(&p, a, Outcome::ConnectFailure, &all, later);
    assert!(o.record(&p, a, Outcome::Response(502, None), &all, later));
    assert_eq!(
        o.available(Some(&p), &all, later + Duration::from_secs(15)),
        [b]
    );
    assert_eq!(
        o.available(Some(&p), &all, later + Duration::from_secs(21)),
        all
    );
    // Panic: with minHealthPercent over the healthy share, everything is used.
    let strict = OutlierPolicy {
        min_health_percent: 60,
        ..p.clone()
    };
    assert_eq!(o.available(Some(&strict), &all, later), all);
    assert_eq!(o.available(None, &all, later), all);
}
