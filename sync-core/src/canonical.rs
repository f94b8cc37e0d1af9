//! The canonical form of synced values: one value per column type that SQLite, PostgreSQL
//! and MySQL/MariaDB all store and read back the same, so that devices on different
//! backends hold identical rows and the log's JSON of a record is the same text whichever
//! backend it was read from.
//!
//! The hooks bring every synced value a write sets into this form before the row is
//! written (`capture::before_save`), so the writer's own row already holds what every
//! other device will store, and refuse the values no form can save (NaN, ±infinity, a
//! decimal too large for its column). Rows read back for the log, `dump` and `audit` pass
//! through it again (`sync_json`), which makes a backend's own rendering (a decimal's scale
//! on SQLite, key order and numbers in `jsonb`, a time zone) compare equal.
//!
//! | Type | Canonical form |
//! | --- | --- |
//! | `f32`, `f64` | finite (NaN and ±infinity refused); `-0.0` becomes `0.0` |
//! | `Decimal` | rounded half away from zero to the column's scale, written at exactly that scale; more integer digits than the column's precision allows refused; unbounded columns hold at most 15 significant digits (SQLite stores decimals as 8-byte floats) |
//! | JSON | keys sorted; a number whose value is an integer that fits `i64`/`u64` is that integer; `-0.0` is `0` |
//! | `NaiveTime` | truncated to microseconds |
//! | `NaiveDate`, `NaiveDateTime` | years 1000 to 9999 (else refused); date-times truncated to microseconds |
//! | `DateTime<Utc>`, `DateTime<Local>` | within 1970-01-01 00:00:01 ..= 2038-01-19 03:14:07 UTC (else refused); truncated to microseconds |
//! | `DateTime<FixedOffset>` | as `DateTime<Utc>`, and the same instant at offset `+00:00` |
//! | text, blobs, integers, booleans, UUIDs, string enums | as written (text: see `limits::check_values`) |

use chrono::{Datelike, SubsecRound, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use sea_orm::sea_query::{ColumnType, Value};
use sea_orm::{ColumnTrait, IdenStatic, Iterable, ModelTrait};

use crate::Syncable;

/// Significant digits an unbounded decimal keeps on every backend: SQLite stores a decimal
/// as an 8-byte float, exact to 15 digits.
pub(crate) const DECIMAL_DIGITS_MAX: u32 = 15;

/// Fractional-second digits every backend keeps: PostgreSQL and MySQL `(6)` columns hold
/// microseconds.
const SUBSEC_DIGITS: u16 = 6;

/// The canonical form of `value` in a column of `column_type`: `Ok(None)` when `value` is
/// canonical already, `Ok(Some(v))` for the value to store instead, `Err(why)` for a value
/// no backend form can hold (`why` completes "field `f` of synced model `m` …").
pub(crate) fn canonical(column_type: &ColumnType, value: &Value) -> Result<Option<Value>, String> {
    Ok(match value {
        Value::Float(Some(f)) => {
            if !f.is_finite() {
                return Err(not_finite(f));
            }
            (*f == 0.0 && f.is_sign_negative()).then_some(Value::Float(Some(0.0)))
        }
        Value::Double(Some(f)) => {
            if !f.is_finite() {
                return Err(not_finite(f));
            }
            (*f == 0.0 && f.is_sign_negative()).then_some(Value::Double(Some(0.0)))
        }
        Value::Decimal(Some(d)) => {
            let canonical = canonical_decimal(column_type, d)?;
            (canonical.to_string() != d.to_string()).then_some(Value::Decimal(Some(canonical)))
        }
        Value::Json(Some(json)) => {
            let canonical = canonical_json(json);
            (canonical_differs(json, &canonical)).then(|| Value::Json(Some(Box::new(canonical))))
        }
        Value::ChronoTime(Some(t)) => {
            let canonical = t.trunc_subsecs(SUBSEC_DIGITS);
            (canonical != *t).then_some(Value::ChronoTime(Some(canonical)))
        }
        Value::ChronoDate(Some(d)) => {
            calendar_year_fits(d.year())?;
            None
        }
        Value::ChronoDateTime(Some(t)) => {
            calendar_year_fits(t.year())?;
            let canonical = t.trunc_subsecs(SUBSEC_DIGITS);
            (canonical != *t).then_some(Value::ChronoDateTime(Some(canonical)))
        }
        Value::ChronoDateTimeUtc(Some(t)) => {
            instant_fits(t.timestamp())?;
            let canonical = t.trunc_subsecs(SUBSEC_DIGITS);
            (canonical != *t).then_some(Value::ChronoDateTimeUtc(Some(canonical)))
        }
        Value::ChronoDateTimeLocal(Some(t)) => {
            instant_fits(t.timestamp())?;
            let canonical = t.trunc_subsecs(SUBSEC_DIGITS);
            (canonical != *t).then_some(Value::ChronoDateTimeLocal(Some(canonical)))
        }
        Value::ChronoDateTimeWithTimeZone(Some(t)) => {
            instant_fits(t.timestamp())?;
            let canonical = t
                .with_timezone(&Utc)
                .fixed_offset()
                .trunc_subsecs(SUBSEC_DIGITS);
            // `==` compares instants: a changed offset must count as a change too.
            (canonical != *t || canonical.offset() != t.offset())
                .then_some(Value::ChronoDateTimeWithTimeZone(Some(canonical)))
        }
        _ => None,
    })
}

/// The instants MySQL/MariaDB store from a `DateTime` with a time zone: sqlx sends them as
/// `TIMESTAMP` values, whose range is 1970-01-01 00:00:01 to 2038-01-19 03:14:07 UTC
/// (outside it MariaDB stores NULL, or refuses the row).
const INSTANT_MIN: i64 = 1;
const INSTANT_MAX: i64 = 2_147_483_647;

fn instant_fits(seconds: i64) -> Result<(), String> {
    if (INSTANT_MIN..=INSTANT_MAX).contains(&seconds) {
        return Ok(());
    }
    Err(
        "holds an instant outside 1970-01-01 00:00:01 ..= 2038-01-19 03:14:07 UTC, the range \
         MySQL/MariaDB store a date-time with a time zone in: store a later or earlier \
         instant, or use a `NaiveDateTime` field (years 1000 to 9999)"
            .to_owned(),
    )
}

/// Dates and date-times without a zone: MySQL/MariaDB `DATE`/`DATETIME` hold years 1000 to
/// 9999.
fn calendar_year_fits(year: i32) -> Result<(), String> {
    if (1000..=9999).contains(&year) {
        return Ok(());
    }
    Err(format!(
        "holds the year {year}; MySQL/MariaDB store years 1000 to 9999 only: store a date in \
         that range"
    ))
}

fn not_finite(f: &dyn std::fmt::Display) -> String {
    format!(
        "holds {f}, which MySQL/MariaDB cannot store and JSON cannot carry: store a finite \
         number (or make the field an `Option` and store `None`)"
    )
}

/// A decimal at its column's scale (rounded half away from zero, as PostgreSQL and MySQL
/// round), refused when its integer part does not fit the column's precision.
fn canonical_decimal(column_type: &ColumnType, d: &Decimal) -> Result<Decimal, String> {
    match column_type {
        ColumnType::Decimal(Some((precision, scale)))
        | ColumnType::Money(Some((precision, scale))) => {
            let mut rounded =
                d.round_dp_with_strategy(*scale, RoundingStrategy::MidpointAwayFromZero);
            rounded.rescale(*scale);
            let integer_digits = digits(rounded.abs().trunc().mantissa().unsigned_abs());
            let allowed = precision.saturating_sub(*scale);
            if integer_digits > allowed {
                return Err(format!(
                    "holds {d}, which has {integer_digits} digits before the decimal point; \
                     its column (precision {precision}, scale {scale}) holds {allowed}: store a \
                     smaller value or widen the column on every device"
                ));
            }
            if *precision > DECIMAL_DIGITS_MAX {
                significant_digits_fit(&rounded)?;
            }
            Ok(rounded)
        }
        _ => {
            let normal = d.normalize();
            significant_digits_fit(&normal)?;
            Ok(normal)
        }
    }
}

fn significant_digits_fit(d: &Decimal) -> Result<(), String> {
    let significant = digits(d.normalize().mantissa().unsigned_abs());
    if significant > DECIMAL_DIGITS_MAX {
        return Err(format!(
            "holds {d}, which has {significant} significant digits; SQLite stores decimals as \
             8-byte floats, exact to {DECIMAL_DIGITS_MAX}: round the value (or store it as text)"
        ));
    }
    Ok(())
}

fn digits(mut n: u128) -> u32 {
    let mut count = 0;
    while n > 0 {
        count += 1;
        n /= 10;
    }
    count
}

/// JSON with sorted keys, integral numbers that fit `i64`/`u64` as integers, and no
/// negative zero. PostgreSQL's `jsonb` prints `1e19` as `10000000000000000000`, which reads
/// back as an integer; MySQL's `JSON` reorders keys.
pub(crate) fn canonical_json(json: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match json {
        J::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => canonical_json_float(f).unwrap_or_else(|| json.clone()),
            _ => json.clone(),
        },
        J::Array(items) => J::Array(items.iter().map(canonical_json).collect()),
        J::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            J::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical_json(v)))
                    .collect(),
            )
        }
        J::Null | J::Bool(_) | J::String(_) => json.clone(),
    }
}

/// A float that is an integer within `i64`/`u64` as that integer.
fn canonical_json_float(f: f64) -> Option<serde_json::Value> {
    if f.fract() != 0.0 || !f.is_finite() {
        return None;
    }
    // 2^63 and 2^64 are exact in f64; the casts below are exact inside these bounds.
    if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f) {
        return Some(serde_json::Value::from(f as i64));
    }
    if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
        return Some(serde_json::Value::from(f as u64));
    }
    None
}

/// Whether `canonical` differs from `json` in what a backend would keep: the numbers' kind,
/// or key order (`serde_json`'s `preserve_order` feature keeps insertion order).
fn canonical_differs(json: &serde_json::Value, canonical: &serde_json::Value) -> bool {
    json != canonical || format!("{json}") != format!("{canonical}")
}

/// Brings every synced value `active` sets into canonical form, or says which one has
/// none (the hooks refuse the write with that message).
pub(crate) fn canonicalise_active<E: Syncable>(active: &mut E::ActiveModel) -> Result<(), String> {
    use sea_orm::{ActiveModelTrait, ActiveValue};
    for column in E::Column::iter() {
        if !is_synced::<E>(&column) {
            continue;
        }
        let ActiveValue::Set(value) = active.get(column) else {
            continue;
        };
        match canonical(column.def().get_column_type(), &value) {
            Ok(None) => {}
            Ok(Some(canonical)) => active.set(column, canonical),
            Err(why) => return Err(field_message::<E>(&column, &why)),
        }
    }
    Ok(())
}

/// The synced fields of `model` in canonical form, as JSON: what the log records and what
/// `dump` and `audit` compare. A stored value without a canonical form (written past the
/// hooks) is rendered as it is.
pub(crate) fn sync_json<E: Syncable>(
    model: &E::Model,
) -> Result<serde_json::Map<String, serde_json::Value>, serde_json::Error> {
    let mut canonical_model: Option<E::Model> = None;
    for column in E::Column::iter() {
        if !is_synced::<E>(&column) {
            continue;
        }
        let value = model.get(column);
        if let Ok(Some(canonical)) = canonical(column.def().get_column_type(), &value) {
            let target = canonical_model.get_or_insert_with(|| model.clone());
            // The canonical value has the column's own type: setting it cannot fail; if it
            // did, the stored value is rendered as it is, and said so.
            if let Err(e) = target.try_set(column, canonical) {
                tracing::warn!(
                    model = E::SYNC_ID,
                    column = IdenStatic::as_str(&column),
                    %e,
                    "a canonical value could not be set; the stored value is used"
                );
            }
        }
    }
    E::sync_json(canonical_model.as_ref().unwrap_or(model))
}

fn is_synced<E: Syncable>(column: &E::Column) -> bool {
    let name = IdenStatic::as_str(column);
    E::FIELDS.iter().any(|f| f.column == name && f.synced)
}

fn field_message<E: Syncable>(column: &E::Column, why: &str) -> String {
    let name = IdenStatic::as_str(column);
    let field = E::FIELDS
        .iter()
        .find(|f| f.column == name)
        .map_or(name, |f| f.name);
    format!("field `{field}` of synced model `{}` {why}", E::SYNC_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_and_keys_are_canonical() {
        let json: serde_json::Value =
            serde_json::from_str(r#"{"b": [1.0, -0.0, 1e19, 1e20, 0.5], "a": 2}"#).expect("json");
        assert_eq!(
            canonical_json(&json).to_string(),
            r#"{"a":2,"b":[1,0,10000000000000000000,1e+20,0.5]}"#
        );
    }

    #[test]
    fn decimals_round_half_away_from_zero_to_the_scale() {
        let column = ColumnType::Decimal(Some((6, 2)));
        let d = |s: &str| s.parse::<Decimal>().expect("decimal");
        assert_eq!(
            canonical_decimal(&column, &d("1.005")).map(|d| d.to_string()),
            Ok("1.01".into())
        );
        assert_eq!(
            canonical_decimal(&column, &d("-1.005")).map(|d| d.to_string()),
            Ok("-1.01".into())
        );
        assert_eq!(
            canonical_decimal(&column, &d("1.5")).map(|d| d.to_string()),
            Ok("1.50".into())
        );
        assert_eq!(
            canonical_decimal(&column, &d("9999.994")).map(|d| d.to_string()),
            Ok("9999.99".into())
        );
        assert!(
            canonical_decimal(&column, &d("9999.995")).is_err(),
            "rounds to 10000.00"
        );
        assert!(canonical_decimal(&ColumnType::Decimal(None), &d("1234567890.123456")).is_err());
    }

    #[test]
    fn times_keep_microseconds_and_utc() {
        use chrono::{FixedOffset, TimeZone, Timelike};
        let zoned = FixedOffset::east_opt(3600)
            .and_then(|o| o.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).single())
            .and_then(|t| t.with_nanosecond(1_999))
            .expect("time");
        let Ok(Some(Value::ChronoDateTimeWithTimeZone(Some(c)))) = canonical(
            &ColumnType::TimestampWithTimeZone,
            &Value::ChronoDateTimeWithTimeZone(Some(zoned)),
        ) else {
            panic!("changed");
        };
        assert_eq!(c.to_rfc3339(), "2026-01-01T00:00:00.000001+00:00");
        assert!(canonical(&ColumnType::Double, &Value::Double(Some(f64::NAN))).is_err());
    }
}
