//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1G`, `1e9`) as numbers, for usage
//! accounting from what pods request.

/// The value of a quantity; `None` if it is not one.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn decimal_binary_and_exponent_forms() {
        let close = |s: &str, v: f64| {
            let got = parse_quantity(s).unwrap_or(f64::NAN);
            assert!((got - v).abs() <= 1e-9 * v.max(1.0), "{s}: {got} != {v}");
        };
        close("500m", 0.5);
        close("2", 2.0);
        close("1.5", 1.5);
        close("512Mi", 512.0 * 1024.0 * 1024.0);
        close("1Gi", 1073741824.0);
        close("1G", 1e9);
        close("128k", 128e3);
        close("1e3", 1000.0);
        close("25E-2", 0.25);
        for bad in ["", "abc", "1Q", "-1", "1e", "Gi"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
