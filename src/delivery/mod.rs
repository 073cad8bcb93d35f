//! Push delivery (being written).
