//! Kubernetes resource quantities in canonical form. Istio's injector round-trips resources through
//! `resource.Quantity`, so `4000m` comes out as `"4"` and `1024Mi` as `1Gi`; we do the same so the
//! injected containers match.

/// Canonical form of a quantity, or `None` when it does not parse.
pub fn canonical(s: &str) -> Option<String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num == "+" || num == "-" {
        return None;
    }
    let negative = num.starts_with('-');
    let digits = num.trim_start_matches(['+', '-']);
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part
            .chars()
            .chain(frac_part.chars())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // Value as an integer count of 10^-9 (decimal) or exact bytes (binary).
    let binary = match suffix {
        "Ki" => Some(1u32),
        "Mi" => Some(2),
        "Gi" => Some(3),
        "Ti" => Some(4),
        "Pi" => Some(5),
        "Ei" => Some(6),
        _ => None,
    };
    let parse_scaled = |scale_exp10: i32| -> Option<i128> {
        // integer + fraction, times 10^scale_exp10, must be integral
        let mut v: i128 = 0;
        for c in int_part.chars() {
            v = v
                .checked_mul(10)?
                .checked_add(i128::from(c.to_digit(10)?))?;
        }
        let mut exp = scale_exp10;
        for c in frac_part.chars() {
            v = v
                .checked_mul(10)?
                .checked_add(i128::from(c.to_digit(10)?))?;
            exp -= 1;
        }
        if exp >= 0 {
            v.checked_mul(10i128.checked_pow(exp as u32)?)
        } else {
            let d = 10i128.checked_pow((-exp) as u32)?;
            (v % d == 0).then(|| v / d)
        }
    };
    let sign = if negative { "-" } else { "" };
    if let Some(k) = binary {
        let unit = 1024i128.pow(k);
        // Exact bytes (fractional binary quantities like 0.5Gi are still whole bytes).
        let nano_bytes = parse_scaled(9)?;
        let bytes_times_unit = nano_bytes.checked_mul(unit)?;
        if bytes_times_unit % 1_000_000_000 != 0 {
            return None;
        }
        let bytes = bytes_times_unit / 1_000_000_000;
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
        if bytes == 0 {
            return Some("0".into());
        }
        for (i, suf) in suffixes.iter().enumerate().rev() {
            let u = 1024i128.pow(i as u32);
            if bytes % u == 0 {
                return Some(format!("{sign}{}{suf}", bytes / u));
            }
        }
        return Some(format!("{sign}{bytes}"));
    }
    let exp10 = match suffix {
        "n" => -9,
        "u" => -6,
        "m" => -3,
        "" => 0,
        "k" => 3,
        "M" => 6,
        "G" => 9,
        "T" => 12,
        "P" => 15,
        "E" => 18,
        s if s.starts_with(['e', 'E']) => s[1..].parse::<i32>().ok()?,
        _ => return None,
    };
    let nanos = parse_scaled(exp10 + 9)?;
    if nanos == 0 {
        return Some("0".into());
    }
    let suffixes = [
        (18, "E"),
        (15, "P"),
        (12, "T"),
        (9, "G"),
        (6, "M"),
        (3, "k"),
        (0, ""),
        (-3, "m"),
        (-6, "u"),
        (-9, "n"),
    ];
    for (e, suf) in suffixes {
        let d = 10i128.pow((e + 9) as u32);
        if nanos % d == 0 {
            return Some(format!("{sign}{}{suf}", nanos / d));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn canonical_forms_match_kubernetes() {
        for (input, want) in [
            ("4000m", "4"),
            ("1000m", "1"),
            ("100m", "100m"),
            ("2000m", "2"),
            ("1.5", "1500m"),
            ("0.1", "100m"),
            ("1024Mi", "1Gi"),
            ("1Gi", "1Gi"),
            ("1536Mi", "1536Mi"),
            ("0.5Gi", "512Mi"),
            ("128Mi", "128Mi"),
            ("2", "2"),
            ("1000", "1k"),
            ("2e3", "2k"),
            ("0", "0"),
        ] {
            assert_eq!(canonical(input).as_deref(), Some(want), "{input}");
        }
        for bad in ["", "abc", "1.2.3", "10Zi", "m"] {
            assert_eq!(canonical(bad), None, "{bad}");
        }
    }
}
