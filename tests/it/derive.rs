//! `#[derive(Syncable)]`: misuse fails to compile with a span on the mistake; the
//! declarations it makes are what the model says.

use example_app::models::{location, tag, temp_file, user_metadata, volume};
use sync_core::{FieldMerge, MergeRule, Syncable};

#[test]
fn misuse_is_a_compile_error_that_points_at_the_mistake() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/fail/*.rs");
    cases.pass("ui/pass/*.rs");
}

fn merge_of<E: Syncable>(field: &str) -> Option<(bool, FieldMerge)> {
    E::FIELDS
        .iter()
        .find(|f| f.name == field)
        .map(|f| (f.synced, f.merge))
}

#[test]
fn declarations_follow_the_attributes() {
    assert_eq!(
        volume::Entity::SYNC_ID,
        "volume",
        "the sync id defaults to the table name"
    );
    assert_eq!(
        volume::Entity::MERGE,
        MergeRule::LastWriteWins,
        "last-write-wins is the default"
    );
    assert_eq!(
        volume::Entity::synced_fields(),
        [
            "id",
            "name",
            "total_capacity",
            "is_tracked",
            "display_name",
            "color",
            "icon"
        ]
    );
    assert_eq!(
        merge_of::<volume::Entity>("mount_point"),
        Some((false, FieldMerge::LastWriteWins))
    );
    assert_eq!(user_metadata::Entity::MERGE, MergeRule::FieldLevel);
    assert_eq!(
        merge_of::<user_metadata::Entity>("tags"),
        Some((true, FieldMerge::Union))
    );
    assert_eq!(
        merge_of::<location::Entity>("name"),
        Some((true, FieldMerge::Manual))
    );
    assert_eq!(
        merge_of::<location::Entity>("indexed_files"),
        Some((true, FieldMerge::LastWriteWins))
    );
    const { assert!(!temp_file::Entity::ENABLED) };
    const { assert!(tag::Entity::ENABLED) };
    let hidden = tag::Model {
        id: uuid::Uuid::nil(),
        name: ".x".into(),
        color: None,
    };
    assert!(
        !tag::Entity::should_sync(&hidden),
        "the per-record filter is wired"
    );
    let registry = example_app::registry();
    assert_eq!(
        registry.synced_models(),
        ["location", "tag", "user_metadata", "volume"]
    );
}

/// The derive's decoder reads an upsert's JSON text straight into the ActiveModel; the
/// reference goes through a `serde_json::Map` and `apply_json`. For any object over the
/// model's field names (and a stranger), with values of every JSON kind, both refuse it or
/// both build the same record.
mod decoder_agrees_with_the_map_path {
    use super::*;
    use proptest::prelude::*;
    use sync_core::__private::decode_upsert_via_map;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            "[a-z ]{0,6}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from(uuid::Uuid::now_v7().to_string())),
            proptest::collection::vec("[a-z]{1,3}", 0..3).prop_map(serde_json::Value::from),
        ]
    }

    /// JSON objects over `E`'s field names plus `stranger`, each present or not; most cases
    /// hold every synced field (so that decoding gets past the presence checks).
    fn object<E: Syncable>() -> impl Strategy<Value = String> {
        let names: Vec<&'static str> = E::FIELDS
            .iter()
            .map(|f| f.name)
            .chain(["stranger"])
            .collect();
        let synced = E::synced_fields();
        proptest::collection::vec((any::<u8>(), value()), names.len()).prop_map(move |picks| {
            let mut map = serde_json::Map::new();
            for (name, (pick, value)) in names.iter().zip(picks) {
                let wanted = if synced.contains(name) {
                    pick % 16 != 0
                } else {
                    pick % 16 == 0
                };
                if wanted {
                    map.insert((*name).to_owned(), value);
                }
            }
            serde_json::Value::Object(map).to_string()
        })
    }

    fn agree<E: Syncable>(data: &str) -> Result<(), TestCaseError>
    where
        E::ActiveModel: PartialEq + std::fmt::Debug,
        E::Key: From<uuid::Uuid>,
    {
        let key = uuid::Uuid::now_v7();
        let direct = E::decode_upsert(key.into(), data);
        let reference = decode_upsert_via_map::<E>(key.into(), data);
        match (direct, reference) {
            (Ok(direct), Ok(reference)) => prop_assert_eq!(direct, reference),
            (Err(_), Err(_)) => {}
            (direct, reference) => prop_assert!(
                false,
                "{data}: the decoder says {:?}, the reference {:?}",
                direct.map(|_| "ok").map_err(|e| e.to_string()),
                reference.map(|_| "ok").map_err(|e| e.to_string())
            ),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn tag(data in object::<tag::Entity>()) { agree::<tag::Entity>(&data)?; }

        #[test]
        fn volume(data in object::<volume::Entity>()) { agree::<volume::Entity>(&data)?; }

        #[test]
        fn user_metadata(data in object::<user_metadata::Entity>()) {
            agree::<user_metadata::Entity>(&data)?;
        }

        #[test]
        fn location(data in object::<location::Entity>()) { agree::<location::Entity>(&data)?; }

        #[test]
        fn integer_keyed_book(data in object::<crate::int_keys::book::Entity>()) {
            agree::<crate::int_keys::book::Entity>(&data)?;
        }
    }

    #[test]
    fn what_the_decoder_refuses() {
        let data = r#"{"id":"x","name":"a"}"#;
        let err =
            tag::Entity::decode_upsert(uuid::Uuid::now_v7(), data).expect_err("color is missing");
        assert!(err.to_string().contains("color"), "{err}");
        let data = r#"{"id":"x","name":"a","color":null,"shade":1}"#;
        let err =
            tag::Entity::decode_upsert(uuid::Uuid::now_v7(), data).expect_err("shade is unknown");
        assert!(err.to_string().contains("shade"), "{err}");
        // A struct could be filled from an array, field by field: not from an entry.
        let data = r#" ["x","a",null]"#;
        tag::Entity::decode_upsert(uuid::Uuid::now_v7(), data).expect_err("not an object");
        decode_upsert_via_map::<tag::Entity>(uuid::Uuid::now_v7(), data)
            .expect_err("not an object either way");
        // A field given twice: refused (the Map path would keep the last).
        let data = r#"{"id":"x","name":"a","name":"b","color":null}"#;
        let err = tag::Entity::decode_upsert(uuid::Uuid::now_v7(), data).expect_err("name twice");
        assert!(err.to_string().contains("name"), "{err}");
        let data = "\n {\"id\":\"x\",\"name\":\"a\",\"color\":null}";
        tag::Entity::decode_upsert(uuid::Uuid::now_v7(), data).expect("every synced field");
    }
}
