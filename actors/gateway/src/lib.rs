//! fsb-gateway: the fast path.
