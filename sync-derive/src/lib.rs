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

mod expand;
mod model;

use proc_macro::TokenStream;

/// See the crate documentation.
#[proc_macro_derive(Syncable, attributes(sync))]
pub fn derive_syncable(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
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
