//! Integration tests live in `it/`; the simulator (bin `simulate`) in `sim`.

pub mod sim;
