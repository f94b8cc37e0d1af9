//! Expands a `SyncModel` into the `Syncable` impl and the hook wiring.

use proc_macro2::TokenStream;
use quote::quote;

use crate::model::{FieldMerge, Merge, SyncModel};

pub(crate) fn expand(model: &SyncModel) -> TokenStream {
    let krate = &model.krate;
    let sea_orm = quote!(#krate::__private::sea_orm);
    let serde_json = quote!(#krate::__private::serde_json);
    let sync_id = &model.sync_id;
    let schema_version = model.schema_version;
    let enabled = model.enabled;
    let merge = match &model.merge {
        Merge::LastWriteWins => quote!(#krate::MergeRule::LastWriteWins),
        Merge::FieldLevel => quote!(#krate::MergeRule::FieldLevel),
        Merge::Manual => quote!(#krate::MergeRule::Manual),
        Merge::Custom(_) => quote!(#krate::MergeRule::Custom),
    };
    let key = &model.fields[model.key];
    let key_ident = &key.ident;
    let key_ty = &key.ty;
    let key_name = key_ident.to_string();
    let local_primary_key = model.local_primary_key;
    let is_key = |f: &crate::model::SyncField| f.ident == *key_ident;
    let key_is_uuid = matches!(&key.ty, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Uuid"));

    let field_specs = model.fields.iter().map(|f| {
        let name = f.ident.to_string();
        let column = &f.column;
        let synced = f.synced;
        let merge = match f.merge {
            FieldMerge::LastWriteWins => quote!(#krate::FieldMerge::LastWriteWins),
            FieldMerge::Union => quote!(#krate::FieldMerge::Union),
            FieldMerge::Manual => quote!(#krate::FieldMerge::Manual),
        };
        quote!(#krate::FieldSpec { name: #name, column: #column, synced: #synced, merge: #merge })
    });
    let synced: Vec<_> = model.fields.iter().filter(|f| f.synced).collect();
    let json_inserts = synced.iter().map(|f| {
        let ident = &f.ident;
        let name = ident.to_string();
        quote!(map.insert(::std::string::String::from(#name), #serde_json::to_value(&model.#ident)?);)
    });
    let set_checks = synced.iter().filter(|f| !is_key(f)).map(|f| {
        let ident = &f.ident;
        let name = ident.to_string();
        quote!(if active.#ident.is_set() { out.push(#name); })
    });
    let apply_fields = synced.iter().filter(|f| !is_key(f)).map(|f| {
        let ident = &f.ident;
        let name = ident.to_string();
        quote! {
            if let ::std::option::Option::Some(value) = fields.get(#name) {
                if only.is_none_or(|names| names.iter().any(|n| n == #name)) {
                    active.#ident = #sea_orm::ActiveValue::Set(#serde_json::from_value(::std::clone::Clone::clone(value))?);
                }
            }
        }
    });
    // The upsert decoder: a struct of the synced fields that serde fills straight from the
    // entry's JSON text. `required` makes a missing field an error even for `Option`s, and
    // unknown fields are refused, as the payload must hold exactly the synced fields.
    let serde_path = quote!(#krate::__private::serde).to_string();
    let required_path = quote!(#krate::__private::required).to_string();
    let row_fields = synced.iter().map(|f| {
        let ident = &f.ident;
        let name = ident.to_string();
        let ty = if is_key(f) {
            quote!(#krate::__private::serde::de::IgnoredAny)
        } else {
            let ty = &f.ty;
            quote!(#ty)
        };
        quote! {
            #[serde(rename = #name, deserialize_with = #required_path)]
            #ident: #ty,
        }
    });
    let row_sets = synced.iter().filter(|f| !is_key(f)).map(|f| {
        let ident = &f.ident;
        quote!(active.#ident = #sea_orm::ActiveValue::Set(row.#ident);)
    });
    // A local primary key stays unset: the database assigns it on insert.
    let local_defaults = model
        .fields
        .iter()
        .filter(|f| !(f.synced || local_primary_key && f.primary_key))
        .map(|f| {
            let ident = &f.ident;
            quote!(active.#ident = #sea_orm::ActiveValue::Set(::std::default::Default::default());)
        });
    let fill_key = if key_is_uuid {
        quote! {
            if active.#key_ident.is_not_set() {
                active.#key_ident = #sea_orm::ActiveValue::Set(<#key_ty>::now_v7());
            }
        }
    } else {
        quote!(let _ = active;)
    };
    let should_sync = model.filter.as_ref().map(|path| {
        quote! {
            const FILTERED: bool = true;

            fn should_sync(model: &Model) -> bool {
                #path(model)
            }
        }
    });
    let merge_custom = match &model.merge {
        Merge::Custom(path) => Some(quote! {
            fn merge_custom(local: &Model, remote: &Model) -> ::std::option::Option<Model> {
                ::std::option::Option::Some(#path(local, remote))
            }
        }),
        _ => None,
    };
    let behavior = (!model.custom_behavior).then(|| {
        quote! {
            #[#krate::__private::async_trait::async_trait]
            impl #sea_orm::ActiveModelBehavior for ActiveModel {
                async fn before_save<C>(self, db: &C, insert: bool) -> ::std::result::Result<Self, #sea_orm::DbErr>
                where
                    C: #sea_orm::ConnectionTrait,
                {
                    #krate::hooks::before_save::<Entity, C>(self, db, insert).await
                }

                async fn after_save<C>(model: Model, db: &C, insert: bool) -> ::std::result::Result<Model, #sea_orm::DbErr>
                where
                    C: #sea_orm::ConnectionTrait,
                {
                    #krate::hooks::after_save::<Entity, C>(model, db, insert).await
                }

                async fn before_delete<C>(self, db: &C) -> ::std::result::Result<Self, #sea_orm::DbErr>
                where
                    C: #sea_orm::ConnectionTrait,
                {
                    #krate::hooks::before_delete::<Entity, C>(self, db).await
                }

                async fn after_delete<C>(self, db: &C) -> ::std::result::Result<Self, #sea_orm::DbErr>
                where
                    C: #sea_orm::ConnectionTrait,
                {
                    #krate::hooks::after_delete::<Entity, C>(self, db).await
                }
            }
        }
    });

    quote! {
        impl #krate::Syncable for Entity {
            const SYNC_ID: &'static str = #sync_id;
            const SCHEMA_VERSION: u32 = #schema_version;
            const ENABLED: bool = #enabled;
            const MERGE: #krate::MergeRule = #merge;
            const FIELDS: &'static [#krate::FieldSpec] = &[#(#field_specs),*];
            const KEY_FIELD: &'static str = #key_name;
            const LOCAL_PRIMARY_KEY: bool = #local_primary_key;
            type Key = #key_ty;

            fn record_key(model: &Model) -> ::std::string::String {
                ::std::string::ToString::to_string(&model.#key_ident)
            }

            fn active_key(active: &ActiveModel) -> ::std::option::Option<::std::string::String> {
                active.#key_ident.try_as_ref().map(::std::string::ToString::to_string)
            }

            fn fill_key(active: &mut ActiveModel) {
                #fill_key
            }

            fn parse_key(
                key: &str,
            ) -> ::std::option::Option<#key_ty> {
                <#key_ty as ::std::str::FromStr>::from_str(key).ok()
            }

            fn set_fields(active: &ActiveModel) -> ::std::vec::Vec<&'static str> {
                let mut out = ::std::vec::Vec::new();
                #(#set_checks)*
                out
            }

            fn apply_json(
                active: &mut ActiveModel,
                fields: &#serde_json::Map<::std::string::String, #serde_json::Value>,
                only: ::std::option::Option<&[::std::string::String]>,
            ) -> ::std::result::Result<(), #serde_json::Error> {
                let _ = (&active, fields, only);
                #(#apply_fields)*
                ::std::result::Result::Ok(())
            }

            fn decode_upsert(
                key: #key_ty,
                data: &str,
            ) -> ::std::result::Result<ActiveModel, #serde_json::Error> {
                #[derive(#krate::__private::serde::Deserialize)]
                #[serde(crate = #serde_path, deny_unknown_fields)]
                #[allow(non_snake_case, dead_code)]
                struct __SyncedFields {
                    #(#row_fields)*
                }
                // A struct would also take a JSON array, field by field: refuse it first.
                if !data.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
                    return ::std::result::Result::Err(
                        <#serde_json::Error as #krate::__private::serde::de::Error>::custom(
                            "the data is not a JSON object",
                        ),
                    );
                }
                let row: __SyncedFields = #serde_json::from_str(data)?;
                let mut active = <Self as #krate::Syncable>::new_active(key);
                #(#row_sets)*
                ::std::result::Result::Ok(active)
            }

            fn new_active(key: #key_ty) -> ActiveModel {
                let mut active = <ActiveModel as #sea_orm::ActiveModelTrait>::default();
                active.#key_ident = #sea_orm::ActiveValue::Set(key);
                #(#local_defaults)*
                active
            }

            fn sync_json(
                model: &Model,
            ) -> ::std::result::Result<#serde_json::Map<::std::string::String, #serde_json::Value>, #serde_json::Error> {
                let mut map = #serde_json::Map::new();
                #(#json_inserts)*
                ::std::result::Result::Ok(map)
            }

            #should_sync
            #merge_custom
        }

        #behavior
    }
}
