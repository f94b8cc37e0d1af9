//! Parses the derive input into a `SyncModel`, collecting every error with its span.

use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Expr, ExprLit, Fields, Lit, LitStr, Path, Type};

pub(crate) struct SyncModel {
    pub(crate) sync_id: String,
    pub(crate) schema_version: u32,
    pub(crate) enabled: bool,
    pub(crate) filter: Option<Path>,
    pub(crate) merge: Merge,
    pub(crate) custom_behavior: bool,
    pub(crate) krate: Path,
    pub(crate) fields: Vec<SyncField>,
    /// Index into `fields` of the field that identifies the record on every device: the
    /// `#[sync(key)]` field when there is one, else the primary key.
    pub(crate) key: usize,
    /// True when the record is identified by a `#[sync(key)]` field: the primary key is
    /// then local to each device (never synced, never set by apply).
    pub(crate) local_primary_key: bool,
}

pub(crate) enum Merge {
    LastWriteWins,
    FieldLevel,
    Manual,
    Custom(Path),
}

#[derive(Copy, Clone, PartialEq, Eq)]
pub(crate) enum FieldMerge {
    LastWriteWins,
    Union,
    Manual,
}

pub(crate) struct SyncField {
    pub(crate) ident: syn::Ident,
    pub(crate) ty: Type,
    pub(crate) column: String,
    pub(crate) synced: bool,
    pub(crate) merge: FieldMerge,
    pub(crate) primary_key: bool,
    pub(crate) auto_increment: Option<bool>,
    /// Marked `#[sync(key)]`.
    pub(crate) sync_key: bool,
}

/// Collects errors so that one compile reports every mistake.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    fn spanned<T: quote::ToTokens>(&mut self, tokens: T, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }
}

impl SyncModel {
    pub(crate) fn parse(input: &DeriveInput) -> Result<SyncModel, syn::Error> {
        let mut errors = Errors::default();
        let Data::Struct(data) = &input.data else {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "Syncable derives on a SeaORM `Model` struct",
            ));
        };
        let Fields::Named(named) = &data.fields else {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "Syncable needs a struct with named fields",
            ));
        };

        let mut table_name = None;
        for attr in &input.attrs {
            if attr.path().is_ident("sea_orm") {
                let _ = attr.parse_nested_meta(|meta| {
                    if meta.path.is_ident("table_name") {
                        table_name = Some(meta.value()?.parse::<LitStr>()?.value());
                    } else if meta.input.peek(syn::Token![=]) {
                        let _: Expr = meta.value()?.parse()?;
                    }
                    Ok(())
                });
            }
        }

        let mut sync_id = None;
        let mut schema_version = 1u32;
        let mut enabled = true;
        let mut filter = None;
        let mut merge = None;
        let mut merge_with = None;
        let mut custom_behavior = false;
        let mut krate: Path = syn::parse_quote!(::sync_core);
        for attr in input.attrs.iter().filter(|a| a.path().is_ident("sync")) {
            let result = attr.parse_nested_meta(|meta| {
                let path = &meta.path;
                if path.is_ident("id") {
                    let lit: LitStr = meta.value()?.parse()?;
                    if lit.value().is_empty() {
                        errors.spanned(&lit, "a sync id cannot be empty");
                    }
                    sync_id = Some(lit.value());
                } else if path.is_ident("schema_version") {
                    let lit: syn::LitInt = meta.value()?.parse()?;
                    match lit.base10_parse::<u32>() {
                        Ok(0) | Err(_) => errors.spanned(&lit, "schema_version is a positive integer"),
                        Ok(v) => schema_version = v,
                    }
                } else if path.is_ident("local") {
                    enabled = false;
                } else if path.is_ident("filter") {
                    filter = Some(meta.value()?.parse::<LitStr>()?.parse::<Path>()?);
                } else if path.is_ident("merge") {
                    let lit: LitStr = meta.value()?.parse()?;
                    merge = match lit.value().as_str() {
                        "lww" | "last_write_wins" => Some(Merge::LastWriteWins),
                        "field" | "field_level" => Some(Merge::FieldLevel),
                        "manual" => Some(Merge::Manual),
                        other => {
                            errors.spanned(
                                &lit,
                                format!(
                                    "unknown merge rule `{other}`: use \"lww\", \"field\" or \"manual\", \
                                     or `merge_with = \"path::to::fn\"` for a custom function"
                                ),
                            );
                            None
                        }
                    };
                } else if path.is_ident("merge_with") {
                    merge_with = Some(meta.value()?.parse::<LitStr>()?.parse::<Path>()?);
                } else if path.is_ident("custom_behavior") {
                    custom_behavior = true;
                } else if path.is_ident("crate") {
                    krate = meta.value()?.parse::<LitStr>()?.parse::<Path>()?;
                } else {
                    errors.spanned(
                        path,
                        "unknown sync attribute: expected one of `id`, `schema_version`, `local`, \
                         `filter`, `merge`, `merge_with`, `custom_behavior`, `crate`",
                    );
                    if meta.input.peek(syn::Token![=]) {
                        let _: Expr = meta.value()?.parse()?;
                    }
                }
                Ok(())
            });
            if let Err(e) = result {
                errors.push(e);
            }
        }
        let merge = match (merge, merge_with) {
            (Some(_), Some(path)) => {
                errors.spanned(&path, "give either `merge` or `merge_with`, not both");
                Merge::Custom(path)
            }
            (_, Some(path)) => Merge::Custom(path),
            (Some(m), None) => m,
            (None, None) => Merge::LastWriteWins,
        };

        // With a sync key, the primary key is local anyway: saying so is no mistake.
        let has_sync_key = named.named.iter().any(|field| {
            field.attrs.iter().any(|attr| {
                let mut key = false;
                if attr.path().is_ident("sync") {
                    let _ = attr.parse_nested_meta(|meta| {
                        key |= meta.path.is_ident("key");
                        if meta.input.peek(syn::Token![=]) {
                            let _: Expr = meta.value()?.parse()?;
                        }
                        Ok(())
                    });
                }
                key
            })
        });
        let mut fields = Vec::new();
        for field in &named.named {
            let Some(ident) = field.ident.clone() else {
                continue;
            };
            let mut column = ident.to_string();
            let mut primary_key = false;
            let mut auto_increment = None;
            let mut synced = true;
            let mut field_merge = FieldMerge::LastWriteWins;
            let mut local_attr: Option<Path> = None;
            let mut sync_key = false;
            for attr in &field.attrs {
                if attr.path().is_ident("sea_orm") {
                    let _ = attr.parse_nested_meta(|meta| {
                        if meta.path.is_ident("primary_key") {
                            primary_key = true;
                        } else if meta.path.is_ident("column_name") {
                            column = meta.value()?.parse::<LitStr>()?.value();
                        } else if meta.path.is_ident("auto_increment") {
                            if let Expr::Lit(ExprLit {
                                lit: Lit::Bool(b), ..
                            }) = meta.value()?.parse()?
                            {
                                auto_increment = Some(b.value);
                            }
                        } else if meta.input.peek(syn::Token![=]) {
                            let _: Expr = meta.value()?.parse()?;
                        } else if meta.input.peek(syn::token::Paren) {
                            let _ = meta.parse_nested_meta(|_| Ok(()));
                        }
                        Ok(())
                    });
                } else if attr.path().is_ident("sync") {
                    let result = attr.parse_nested_meta(|meta| {
                        if meta.path.is_ident("local") {
                            synced = false;
                            local_attr = Some(meta.path.clone());
                        } else if meta.path.is_ident("union") {
                            field_merge = FieldMerge::Union;
                        } else if meta.path.is_ident("manual") {
                            field_merge = FieldMerge::Manual;
                        } else if meta.path.is_ident("key") {
                            sync_key = true;
                        } else {
                            errors.spanned(
                                &meta.path,
                                "unknown sync field attribute: expected `key`, `local`, `union` or `manual`",
                            );
                            if meta.input.peek(syn::Token![=]) {
                                let _: Expr = meta.value()?.parse()?;
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = result {
                        errors.push(e);
                    }
                }
            }
            if let Some(path) = &local_attr {
                if sync_key {
                    errors.spanned(
                        path,
                        "the sync key cannot be local: it identifies the record on every device",
                    );
                } else if primary_key && !has_sync_key {
                    errors.spanned(
                        path,
                        "the primary key cannot be local: it identifies the record on every \
                         device (or give the model a `#[sync(key)]` field, and the primary key \
                         is local)",
                    );
                } else if field_merge != FieldMerge::LastWriteWins {
                    errors.spanned(path, "a local field does not sync, so it has no merge rule");
                }
            }
            fields.push(SyncField {
                ident,
                ty: field.ty.clone(),
                column,
                synced,
                merge: field_merge,
                primary_key,
                auto_increment,
                sync_key,
            });
        }

        let keys: Vec<usize> = fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.primary_key)
            .map(|(i, _)| i)
            .collect();
        let sync_keys: Vec<usize> = fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.sync_key)
            .map(|(i, _)| i)
            .collect();
        let mut local_primary_key = false;
        let key = if let [first, rest @ ..] = sync_keys.as_slice() {
            for extra in rest {
                errors.spanned(
                    &fields[*extra].ident,
                    "a model has one `#[sync(key)]` field: remove this one",
                );
            }
            let field = &fields[*first];
            if !is_type(&field.ty, "Uuid") {
                errors.push(syn::Error::new(
                    field.ty.span(),
                    "a `#[sync(key)]` field is a `Uuid` (the hooks fill it with UUID v7 on insert)",
                ));
            }
            if keys.is_empty() {
                errors.spanned(
                    &input.ident,
                    "a synced model needs a `#[sea_orm(primary_key)]` field",
                );
            }
            // A primary key that is the sync key itself is the Uuid-keyed case. A single
            // other one (an auto-increment integer) is local to each device; the members
            // of a composite key (a join table's references) sync as they are.
            local_primary_key = !field.primary_key && keys.len() == 1;
            if local_primary_key {
                fields[keys[0]].synced = false;
            }
            *first
        } else if !enabled {
            // A model that never syncs may have any key: nothing identifies it elsewhere.
            keys.first().copied().unwrap_or(0)
        } else {
            match keys.as_slice() {
                [single] => {
                    check_key_is_global(&fields[*single], &mut errors);
                    *single
                }
                [] => {
                    errors.spanned(
                        &input.ident,
                        "a synced model needs a `#[sea_orm(primary_key)]` field",
                    );
                    0
                }
                [_, second, ..] => {
                    errors.spanned(
                        &fields[*second].ident,
                        format!(
                            "a composite primary key does not identify a record across devices: \
                             give the model a sync key, {ADD_SYNC_KEY}"
                        ),
                    );
                    keys[0]
                }
            }
        };
        if fields.is_empty() {
            errors.spanned(&input.ident, "a synced model needs fields");
        }

        if let Some(e) = errors.0 {
            return Err(e);
        }
        let sync_id = sync_id
            .or(table_name)
            .unwrap_or_else(|| to_snake(&input.ident.to_string()));
        if sync_id.starts_with("sync.") {
            return Err(syn::Error::new_spanned(
                &input.ident,
                format!(
                    "the sync id `{sync_id}` starts with `sync.`, which is reserved for \
                     sync-core's own log entries: give the model `#[sync(id = \"...\")]`"
                ),
            ));
        }
        Ok(SyncModel {
            sync_id,
            schema_version,
            enabled,
            filter,
            merge,
            custom_behavior,
            krate,
            fields,
            key,
            local_primary_key,
        })
    }
}

/// How to add a sync key, quoted by the errors that ask for one.
const ADD_SYNC_KEY: &str = "a `Uuid` column marked `#[sync(key)]` (e.g. \
    `#[sync(key)] #[sea_orm(unique)] pub sync_key: Uuid`), filled with UUID v7 by the hooks on \
    insert; for a table that already has rows, `sync_migrations::add_sync_key` adds the \
    column and backfills it. The primary key then stays local to each device";

fn is_type(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == name))
}

/// Auto-increment keys are handed out per database: two devices both make record 1. A
/// model without a sync key must have a key that is unique across devices.
fn check_key_is_global(field: &SyncField, errors: &mut Errors) {
    let last = match &field.ty {
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    };
    match last.as_deref() {
        Some("Uuid") | Some("String") => {
            if field.auto_increment == Some(true) {
                errors.spanned(&field.ident, "a synced key cannot be auto_increment");
            }
        }
        Some("i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64") => {
            errors.push(syn::Error::new(
                field.ty.span(),
                format!(
                    "an integer primary key is numbered per database, so it cannot identify a \
                     record across devices: give the model a sync key, {ADD_SYNC_KEY}"
                ),
            ))
        }
        _ => errors.push(syn::Error::new(
            field.ty.span(),
            format!(
                "a synced key must be globally unique: use a `Uuid` primary key (v7 \
                 recommended), a `String` your app makes unique, or give the model a sync \
                 key, {ADD_SYNC_KEY}"
            ),
        )),
    }
}

fn to_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, ch) in name.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(ch.to_lowercase());
    }
    out
}
