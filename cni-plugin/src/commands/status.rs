//! STATUS: ready to add pods once overlayd has leased a subnet (the subnet file exists and parses).

use crate::config::NetConf;
use crate::error::{code, CniError};

pub fn status(conf: &NetConf) -> Result<(), CniError> {
    super::read_subnet_file(conf)
        .map(drop)
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))
}
