//! Kubernetes-style resource quantities, parsed into exact integers so limits written
//! to cgroups are what the user asked for.

use crate::spec::SpecError;

/// CPU in thousandths of a core (`500m` = 500, `1.5` = 1500).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct MilliCpu(pub u64);

/// Memory in bytes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Bytes(pub u64);

impl MilliCpu {
    /// Parse `250m`, `1`, `0.5`; zero and negative values are rejected.
    pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        let value = if let Some(m) = s.strip_suffix('m') {
            parse_decimal(m, 1).filter(|_| !m.contains('.'))
        } else {
            parse_decimal(s, 1000)
        };
        match value {
            Some(0) => Err(SpecError::new(field, "cpu must be greater than 0")),
            Some(v) => Ok(Self(v)),
            None => Err(SpecError::new(
                field,
                format!("invalid cpu quantity {s:?} (examples: \"500m\", \"1\", \"1.5\")"),
            )),
        }
    }
}

impl Bytes {
    /// Parse `64Mi`, `1G`, `1048576`, `1.5Gi`; zero and negative values are rejected.
    pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        const SUFFIXES: [(&str, u64); 12] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("Pi", 1 << 50),
            ("Ei", 1 << 60),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
            ("P", 1_000_000_000_000_000),
            ("E", 1_000_000_000_000_000_000),
        ];
        let (number, scale) = SUFFIXES
            .iter()
            .find_map(|(suffix, scale)| s.strip_suffix(suffix).map(|n| (n, *scale)))
            .unwrap_or((s, 1));
        match parse_decimal(number, scale) {
            Some(0) => Err(SpecError::new(field, "memory must be greater than 0")),
            Some(v) => Ok(Self(v)),
            None => Err(SpecError::new(
                field,
                format!("invalid memory quantity {s:?} (examples: \"256Mi\", \"1Gi\", \"500M\")"),
            )),
        }
    }
}

/// `digits[.digits] * scale`, exact, rounding a fractional remainder up; None on
/// malformed input or overflow.
fn parse_decimal(s: &str, scale: u64) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) || (s.contains('.') && frac.is_empty()) || frac.len() > 9 {
        return None;
    }
    let whole = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().ok()?
    };
    let mut total = whole.checked_mul(scale)?;
    if !frac.is_empty() {
        let denom = 10u128.pow(u32::try_from(frac.len()).ok()?);
        let num = u128::from(frac.parse::<u64>().ok()?) * u128::from(scale);
        let part = u64::try_from(num.div_ceil(denom)).ok()?;
        total = total.checked_add(part)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(MilliCpu::parse("cpu", "500m").unwrap(), MilliCpu(500));
        assert_eq!(MilliCpu::parse("cpu", "1").unwrap(), MilliCpu(1000));
        assert_eq!(MilliCpu::parse("cpu", "1.5").unwrap(), MilliCpu(1500));
        assert_eq!(MilliCpu::parse("cpu", "0.001").unwrap(), MilliCpu(1));
        for bad in ["", "0", "0m", "-1", "1.5m", "abc", "1.", ".", "1e3"] {
            assert_eq!(
                MilliCpu::parse("spec.resources.cpu", bad)
                    .unwrap_err()
                    .field(),
                "spec.resources.cpu"
            );
        }
    }

    #[test]
    fn memory() {
        assert_eq!(Bytes::parse("m", "64Mi").unwrap(), Bytes(64 << 20));
        assert_eq!(Bytes::parse("m", "1G").unwrap(), Bytes(1_000_000_000));
        assert_eq!(Bytes::parse("m", "1.5Gi").unwrap(), Bytes(3 << 29));
        assert_eq!(Bytes::parse("m", "4096").unwrap(), Bytes(4096));
        for bad in ["", "0", "Mi", "-1Mi", "12Xi", "99999999999Ei"] {
            assert!(Bytes::parse("m", bad).is_err(), "{bad}");
        }
    }
}
