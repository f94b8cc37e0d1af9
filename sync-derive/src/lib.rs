//! `#[derive(Syncable)]`: declares how a SeaORM model syncs and wires its capture hooks.
//!
//! Place it beside `DeriveEntityModel` on the entity's `Model`:
//!
//! ```ignore
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
        Err(errors) => errors.to_compile_error().into(),
    }
}
