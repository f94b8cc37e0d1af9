//! `#[derive(Syncable)]`: declares how a SeaORM model syncs and wires its capture hooks.
//!
//! Place it beside `DeriveEntityModel` on the entity's `Model`:
//!
//! ```text
//! #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Syncable)]
//! #[sea_orm(table_name = "volume")]
//! #[sync(id = "volume", merge = "field")]
//! pub struct Model {
//!     #[sea_orm(primary_key, auto_increment = false)]
//!     pub id: Uuid,
//!     pub name: String,
//!     #[sync(local)]
//!     pub mount_point: String,
//! }
//! ```
//!
//! Struct attributes: `id = "…"`, `schema_version = N`, `local` (never syncs),
//! `filter = "path::to::fn"` (`fn(&Model) -> bool`), `merge = "lww" | "field" | "manual"`,
//! `merge_with = "path::to::fn"` (`fn(&Model, &Model) -> Model`, the custom rule),
//! `custom_behavior` (the app writes `ActiveModelBehavior` itself and calls
//! `sync_core::hooks`), `crate = "path"`. Field attributes: `local`, `union`, `manual`.
//!
//! SeaORM 2's dense format works unchanged: put `#[derive(Syncable)]` and `#[sync(…)]` on
//! the struct under `#[sea_orm::model]` as on a classic `Model`. That attribute copies the
//! struct, its derives and its attributes onto a second struct, `ModelEx` (the model with
//! its relation fields), whose `DeriveModelEx` refers to the same `Entity` and
//! `ActiveModel`. The derive expands to nothing there: the `Model` expansion has already
//! declared everything, and a second one would conflict.

mod expand;
mod model;

use proc_macro::TokenStream;

/// See the crate documentation.
#[proc_macro_derive(Syncable, attributes(sync))]
pub fn derive_syncable(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    if is_model_ex_copy(&input) {
        return TokenStream::new();
    }
    match model::SyncModel::parse(&input) {
        Ok(model) => expand::expand(&model).into(),
        Err(errors) => {
            // Still implement `ActiveModelBehavior` (unless the app does), so that the
            // compiler reports the mistake alone rather than a cascade of missing impls.
            let mut out = errors.to_compile_error();
            if !asks_for_custom_behavior(&input) {
                out.extend(quote::quote! {
                    impl ::sea_orm::ActiveModelBehavior for ActiveModel {}
                });
            }
            out.into()
        }
    }
}

/// Whether `input` is the `ModelEx` that `#[sea_orm::model]` (and `compact_model`) writes
/// beside `Model`, carrying a copy of every derive on it. sea-orm-macros 2 adds no marker
/// attribute to the copy, but the name is fixed: `DeriveEntityModel` names it `ModelEx`
/// (`model_ex = ModelEx` on the entity), so no other struct an entity module derives on is
/// called that.
fn is_model_ex_copy(input: &syn::DeriveInput) -> bool {
    input.ident == "ModelEx"
}

fn asks_for_custom_behavior(input: &syn::DeriveInput) -> bool {
    input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("sync"))
        .any(|a| {
            let mut found = false;
            let _ = a.parse_nested_meta(|meta| {
                found |= meta.path.is_ident("custom_behavior");
                if meta.input.peek(syn::Token![=]) {
                    let _: syn::Expr = meta.value()?.parse()?;
                }
                Ok(())
            });
            found
        })
}
