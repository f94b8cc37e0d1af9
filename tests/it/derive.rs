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
