//! Exact money: amounts are integers of 1/10_000 of a currency unit (`Decimal128(18, 4)` in
//! Arrow, `NUMERIC(18,4)` or a scaled INTEGER in the warehouses). Parsing never goes through
//! f64 and never rounds: a value with more than four decimal places is an error, not a guess.

use rust_decimal::Decimal;

/// Digits after the decimal point that every stored amount carries.
pub const MONEY_SCALE: u32 = 4;
/// Total significant digits an amount may have (14 before the point, 4 after).
pub const MONEY_PRECISION: u8 = 18;
const SCALE_FACTOR: i128 = 10_000;
const MAX_UNITS: i128 = 999_999_999_999_999_999;

/// How a source writes numbers: the decimal mark and the optional digit-group separator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecimalFormat {
    /// The decimal mark, `.` or `,`.
    pub decimal_separator: u8,
    /// The thousands separator, if the source groups digits (`,`, `.`, `'`, ` `).
    pub thousands_separator: Option<u8>,
}

impl Default for DecimalFormat {
    fn default() -> Self {
        DecimalFormat {
            decimal_separator: b'.',
            thousands_separator: Some(b','),
        }
    }
}

/// Why a string is not an amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountError {
    /// Not a number in the declared format.
    Malformed,
    /// More than four digits after the decimal mark (other than trailing zeros).
    TooManyDecimals,
    /// More than 14 digits before the decimal mark.
    TooLarge,
}

impl AmountError {
    /// A sentence for the quarantine record.
    pub fn message(&self) -> &'static str {
        match self {
            AmountError::Malformed => "not a decimal number in the declared format",
            AmountError::TooManyDecimals => "more than 4 decimal places; amounts are never rounded",
            AmountError::TooLarge => "amount exceeds 14 integer digits",
        }
    }
}

/// Parses `text` as an amount in units of 1/10_000.
///
/// Accepts an optional sign (`-12.5`, `+3`), accounting negatives (`(12.50)`), digit groups
/// of exactly three when the format declares a separator (`1,234,567.89`), and surrounding
/// spaces. Rejects anything else, including exponents and currency symbols.
pub fn parse_amount(text: &str, format: DecimalFormat) -> Result<i128, AmountError> {
    let mut s = text.trim().as_bytes();
    let mut negative = false;
    if let [b'(', inner @ .., b')'] = s {
        negative = true;
        s = inner;
    }
    match s.first() {
        Some(b'-') => {
            if negative {
                return Err(AmountError::Malformed);
            }
            negative = true;
            s = &s[1..];
        }
        Some(b'+') => s = &s[1..],
        _ => {}
    }
    if s.is_empty() {
        return Err(AmountError::Malformed);
    }
    let mut units: i128 = 0;
    let mut int_digits = 0usize;
    let mut group_len: Option<usize> = None; // digits since the last group separator
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b.is_ascii_digit() {
            if int_digits == 0 && units == 0 && b == b'0' {
                // leading zeros do not count towards the 14 integer digits
            } else {
                int_digits += 1;
            }
            units = units * 10 + i128::from(b - b'0');
            if let Some(g) = group_len.as_mut() {
                *g += 1;
            }
        } else if Some(b) == format.thousands_separator && b != format.decimal_separator {
            // A group separator needs 1-3 digits before the first one and exactly 3 between.
            let digits_so_far = i;
            match group_len {
                None if (1..=3).contains(&digits_so_far) => {}
                Some(3) => {}
                _ => return Err(AmountError::Malformed),
            }
            group_len = Some(0);
        } else if b == format.decimal_separator {
            break;
        } else {
            return Err(AmountError::Malformed);
        }
        i += 1;
    }
    if matches!(group_len, Some(g) if g != 3) {
        return Err(AmountError::Malformed);
    }
    if int_digits > 14 {
        return Err(AmountError::TooLarge);
    }
    units *= SCALE_FACTOR;
    if i < s.len() {
        // fractional part
        let frac = &s[i + 1..];
        if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) {
            return Err(AmountError::Malformed);
        }
        let significant = frac.iter().rposition(|&b| b != b'0').map_or(0, |p| p + 1);
        if significant > MONEY_SCALE as usize {
            return Err(AmountError::TooManyDecimals);
        }
        let mut scale = SCALE_FACTOR / 10;
        for &b in &frac[..significant] {
            units += i128::from(b - b'0') * scale;
            scale /= 10;
        }
    }
    if units > MAX_UNITS {
        return Err(AmountError::TooLarge);
    }
    Ok(if negative { -units } else { units })
}

/// Converts scaled units to an exact [`Decimal`] with four decimal places.
pub fn units_to_decimal(units: i128) -> Decimal {
    // 18 digits always fit in a Decimal's 96-bit mantissa.
    Decimal::from_i128_with_scale(units, MONEY_SCALE)
}

/// Formats scaled units as a plain decimal string with exactly two decimal places when the
/// extra two are zero, four otherwise (`1234.5` -> `"1234.50"`, `0.125` -> `"0.1250"`).
pub fn format_units(units: i128) -> String {
    display_decimal(units).to_string()
}

/// Scaled units as a [`Decimal`] with two decimal places when the last two of the four are
/// zero, four otherwise; the scale shows in its string form.
pub fn display_decimal(units: i128) -> Decimal {
    let mut d = units_to_decimal(units);
    if units % 100 == 0 {
        d.rescale(2);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<i128, AmountError> {
        parse_amount(s, DecimalFormat::default())
    }

    #[test]
    fn parses_plain_grouped_and_negative_amounts_exactly() {
        assert_eq!(p("1234.56"), Ok(12_345_600));
        assert_eq!(p("1,234.56"), Ok(12_345_600));
        assert_eq!(p("-0.0001"), Ok(-1));
        assert_eq!(p("(12.50)"), Ok(-125_000));
        assert_eq!(p(" 7 "), Ok(70_000));
        assert_eq!(p("0.10000"), Ok(1_000));
        assert_eq!(p(".5"), Ok(5_000));
        assert_eq!(p("99999999999999.9999"), Ok(999_999_999_999_999_999));
    }

    #[test]
    fn rejects_rounding_bad_groups_and_junk() {
        assert_eq!(p("1.00001"), Err(AmountError::TooManyDecimals));
        assert_eq!(p("1,5"), Err(AmountError::Malformed));
        assert_eq!(p("1234,567.00"), Err(AmountError::Malformed));
        assert_eq!(p("12,34"), Err(AmountError::Malformed));
        assert_eq!(p("1e5"), Err(AmountError::Malformed));
        assert_eq!(p("$5"), Err(AmountError::Malformed));
        assert_eq!(p(""), Err(AmountError::Malformed));
        assert_eq!(p("-"), Err(AmountError::Malformed));
        assert_eq!(p("1."), Err(AmountError::Malformed));
        assert_eq!(p("100000000000000"), Err(AmountError::TooLarge));
    }

    #[test]
    fn decimal_comma_format() {
        let f = DecimalFormat {
            decimal_separator: b',',
            thousands_separator: Some(b'.'),
        };
        assert_eq!(parse_amount("1.234,5", f), Ok(12_345_000));
        assert_eq!(parse_amount("0,75", f), Ok(7_500));
        assert_eq!(parse_amount("1,2,3", f), Err(AmountError::Malformed));
    }

    #[test]
    fn formats_with_two_or_four_places() {
        assert_eq!(format_units(12_345_000), "1234.50");
        assert_eq!(format_units(-1), "-0.0001");
        assert_eq!(format_units(0), "0.00");
    }
}
