//! fsb: run local mode and talk to the fast path.

fn main() {}
