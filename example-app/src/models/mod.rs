//! The media library's models.

pub mod location;
pub mod tag;
pub mod temp_file;
pub mod user_metadata;
pub mod volume;
