//! Nothing in a log is unservable: the limits a synced record is held to, checked when the
//! record is written, before it reaches the database.
//!
//! A record's synced data fits [`RECORD_BYTES_MAX`], so every entry fits a pull response
//! (`PULL_BYTES_MAX` holds at least one entry, however large) and every response fits the
//! transport's frame. Values some backend a library may run on cannot store (text with a
//! NUL, text longer than its column) are refused too. Caught here, the writer learns it at
//! once; caught on another device, the change would have to be set aside there. A pushed
//! change over the limit is rejected by the leader (`take.rs`).

use sea_orm::DbErr;

use crate::Syncable;

/// Bytes of synced data (the JSON text of its synced fields) one record may hold. A write
/// of a larger record is refused when it is made, and a pushed change larger than this is
/// rejected: every entry in a log fits a pull response, and every pull response fits the
/// transport's frame, so nothing in a log can be unservable.
pub const RECORD_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Refuses a record of `model` whose synced data is `bytes` long, over [`RECORD_BYTES_MAX`].
pub(crate) fn check_record_size(model: &str, record: &str, bytes: usize) -> Result<(), DbErr> {
    if bytes > RECORD_BYTES_MAX {
        return Err(DbErr::Custom(format!(
            "record `{record}` of synced model `{model}` holds {bytes} bytes of synced data; a \
             record may hold at most {RECORD_BYTES_MAX} (`sync_core::RECORD_BYTES_MAX`) so \
             that every device can receive it: keep large content out of synced fields (a \
             `#[sync(local)]` field, or a file the record names)"
        )));
    }
    Ok(())
}

/// Refuses, before they reach the database, values of synced fields that some backend a
/// library may run on cannot store, where the model says enough to know: text with a NUL
/// character (PostgreSQL refuses it in `text` and `jsonb`), and text longer than the
/// column's declared length (`String(StringLen::N(n))`, `Char(Some(n))`), which
/// PostgreSQL and MySQL refuse and SQLite stores. Caught here, the writer learns it at
/// once; caught on another device, the change would have to be set aside there.
pub(crate) fn check_values<E: Syncable>(active: &E::ActiveModel) -> Result<(), DbErr> {
    use sea_orm::sea_query::StringLen;
    use sea_orm::{ActiveModelTrait, ActiveValue, ColumnTrait, ColumnType, Iterable, Value};
    // What the values set now add up to: a record over the limit is refused before the
    // database sees it (after the write, `synced_json` checks the whole record).
    let mut bytes = 0usize;
    let too_large = |bytes: usize| {
        DbErr::Custom(format!(
            "a write of synced model `{}` sets {bytes} bytes of synced data; a record may \
             hold at most {RECORD_BYTES_MAX} (`sync_core::RECORD_BYTES_MAX`) so that every \
             device can receive it: keep large content out of synced fields (a \
             `#[sync(local)]` field, or a file the record names)",
            E::SYNC_ID
        ))
    };
    for column in E::Column::iter() {
        let name = sea_orm::IdenStatic::as_str(&column);
        let Some(field) = E::FIELDS.iter().find(|f| f.column == name) else {
            continue;
        };
        if !field.synced {
            continue;
        }
        let ActiveValue::Set(value) = active.get(column) else {
            continue;
        };
        let text = match &value {
            Value::String(Some(text)) => text.as_str(),
            Value::Bytes(Some(blob)) => {
                bytes += blob.len();
                if bytes > RECORD_BYTES_MAX {
                    return Err(too_large(bytes));
                }
                continue;
            }
            Value::Json(Some(json)) => {
                let json = json.to_string();
                bytes += json.len();
                if bytes > RECORD_BYTES_MAX {
                    return Err(too_large(bytes));
                }
                if json.contains("\\u0000") {
                    return Err(DbErr::Custom(format!(
                        "field `{}` of synced model `{}` holds a NUL character (\\u0000) in \
                         JSON, which PostgreSQL cannot store: remove it before saving",
                        field.name,
                        E::SYNC_ID
                    )));
                }
                continue;
            }
            _ => continue,
        };
        bytes += text.len();
        if bytes > RECORD_BYTES_MAX {
            return Err(too_large(bytes));
        }
        if text.contains('\0') {
            return Err(DbErr::Custom(format!(
                "field `{}` of synced model `{}` holds a NUL character, which PostgreSQL \
                 cannot store in text: remove it before saving (store binary data in a \
                 `Vec<u8>` field)",
                field.name,
                E::SYNC_ID
            )));
        }
        let limit = match column.def().get_column_type() {
            ColumnType::String(StringLen::N(n)) => Some(*n as usize),
            ColumnType::Char(Some(n)) => Some(*n as usize),
            _ => None,
        };
        if let Some(limit) = limit {
            let length = text.chars().count();
            if length > limit {
                return Err(DbErr::Custom(format!(
                    "field `{}` of synced model `{}` is {length} characters long; its column \
                     holds at most {limit}: shorten the value (PostgreSQL and MySQL refuse \
                     it, so other devices could not store it)",
                    field.name,
                    E::SYNC_ID
                )));
            }
        }
    }
    Ok(())
}
