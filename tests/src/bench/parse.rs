//! Reading what the load generators print: pure functions from their output to numbers, tested
//! with real output below.

use serde_json::Value;

/// What one load run measured (client side).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    /// Completed requests per second (0 for TCP).
    pub rps: f64,
    /// TCP bulk throughput, Gbit/s (0 for HTTP).
    pub gbps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Requests that completed (any status).
    pub requests: u64,
    /// Socket errors, timeouts, failed or errored requests, and non-2xx answers.
    pub errors: u64,
}

/// A duration as wrk prints it (`591.70us`, `1.78ms`, `2.01s`) in milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))?;
    let n: f64 = num.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

/// `wrk --latency` output.
pub fn wrk(out: &str) -> Result<Load, String> {
    let mut load = Load::default();
    let mut seen = (false, false);
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => {
                load.rps = v.parse().map_err(|_| format!("wrk: bad rate {v:?}"))?;
                seen.0 = true;
            }
            (Some(p @ ("50%" | "90%" | "99%")), Some(v)) => {
                let ms = wrk_ms(v).ok_or_else(|| format!("wrk: bad latency {v:?}"))?;
                match p {
                    "50%" => load.p50_ms = ms,
                    "90%" => load.p90_ms = ms,
                    _ => {
                        load.p99_ms = ms;
                        seen.1 = true;
                    }
                }
            }
            (Some(n), Some("requests")) if line.contains(" requests in ") => {
                load.requests = n.parse().unwrap_or(0);
            }
            (Some("Socket"), Some("errors:")) => {
                // Socket errors: connect 0, read 0, write 0, timeout 0
                load.errors += line
                    .split([',', ':'])
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            (Some("Non-2xx"), _) => {
                load.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    match seen {
        (true, true) => Ok(load),
        _ => Err(format!(
            "wrk printed no rate or latency distribution:\n{out}"
        )),
    }
}

/// h2load's summary (`finished in`, `requests:`, `status codes:`); latency comes from its
/// per-request log, see [`h2load_log`].
pub fn h2load(out: &str) -> Result<Load, String> {
    let mut load = Load::default();
    let mut seen = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 3.00s, 19089.67 req/s, 19.44MB/s
            load.rps = rest
                .split(", ")
                .nth(1)
                .and_then(|r| r.strip_suffix(" req/s"))
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| format!("h2load: bad line {line:?}"))?;
            seen = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: 57269 total, 57397 started, 57269 done, 57269 succeeded, 0 failed, 0 errored, 0 timeout
            for part in rest.split(", ") {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "done" => load.requests = n,
                    "failed" | "errored" | "timeout" => load.errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: 57269 2xx, 0 3xx, 0 4xx, 0 5xx
            for part in rest.split(", ") {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(class)) = (w.next(), w.next())
                    && class != "2xx"
                {
                    load.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    if seen {
        Ok(load)
    } else {
        Err(format!("h2load printed no summary:\n{out}"))
    }
}

/// h2load's `--log-file`: one request per line, `start(us) <tab> status <tab> duration(us)`.
/// Returns the durations in milliseconds (failed requests have status -1 and are left out).
pub fn h2load_log(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, status, us) = (f.next()?, f.next()?, f.next()?);
            (status.trim() != "-1").then_some(())?;
            us.trim().parse::<f64>().ok().map(|us| us / 1000.0)
        })
        .collect()
}

/// The `q`-quantile (0..=1) of `v` by nearest rank; 0 for no samples.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median of `v` (mean of the middle two for an even count); 0 for no samples.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `iperf3 -J` client output: received Gbit/s and retransmits.
pub fn iperf3(json: &str) -> Result<(f64, u64), String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {err}"));
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3: no end.sum_received.bits_per_second")?;
    let retrans = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retrans))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://10.88.0.2:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.88ms  591.70us   8.61ms   73.63%
    Req/Sec    17.07k     1.39k   18.32k    90.00%
  Latency Distribution
     50%  591.70us
     75%    2.27ms
     90%    2.55ms
     99%    1.02s
  50958 requests in 3.00s, 62.11MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:  16983.97
Transfer/sec:     20.70MB
";

    #[test]
    fn wrk_output() {
        let l = wrk(WRK).unwrap();
        assert_eq!(l.rps, 16983.97);
        assert!((l.p50_ms - 0.5917).abs() < 1e-9);
        assert_eq!((l.p90_ms, l.p99_ms), (2.55, 1020.0));
        assert_eq!(l.requests, 50958);
        assert_eq!(l.errors, 1 + 2 + 3 + 5);
        assert!(wrk("unable to connect to 10.0.0.1:80 Connection refused").is_err());
    }

    const H2LOAD: &str = "finished in 3.00s, 19089.67 req/s, 19.44MB/s
requests: 57269 total, 57397 started, 57260 done, 57250 succeeded, 4 failed, 2 errored, 1 timeout
status codes: 57250 2xx, 0 3xx, 3 4xx, 7 5xx
traffic: 23.63MB (24782680) total
";

    #[test]
    fn h2load_output_and_log() {
        let l = h2load(H2LOAD).unwrap();
        assert_eq!(l.rps, 19089.67);
        assert_eq!(l.requests, 57260);
        assert_eq!(l.errors, 4 + 2 + 1 + 3 + 7);
        assert!(h2load("connect error").is_err());
        let ms = h2load_log("1795486389475019\t200\t887\n1795486389475067\t-1\t5\n1\t200\t1016\n");
        assert_eq!(ms, vec![0.887, 1.016]);
    }

    #[test]
    fn quantiles_and_medians() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn iperf3_json() {
        let j = r#"{"end": {"sum_sent": {"retransmits": 508}, "sum_received": {"bits_per_second": 6512092013.8}}}"#;
        let (g, r) = iperf3(j).unwrap();
        assert!((g - 6.5120920138).abs() < 1e-9);
        assert_eq!(r, 508);
        assert!(iperf3(r#"{"error": "unable to connect"}"#).is_err());
    }
}
