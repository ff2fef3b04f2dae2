//! One module per subcommand.

pub mod cleanup;
pub mod config;
pub mod doctor;
pub mod release;
pub mod run;
pub mod status;
pub mod uninstall;
