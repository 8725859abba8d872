//! Image reference parsing: never panics, and a parsed reference is normalized for
//! good (parsing its own text gives it back) with consistent parts.
#![no_main]

use fsb_core::ImageRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = ImageRef::parse("spec.image", input) else {
        return;
    };
    let again = ImageRef::parse("spec.image", r.as_str()).expect("a normalized reference parses");
    assert_eq!(again, r, "normalization is idempotent");
    assert_eq!(r.name(), format!("{}/{}", r.domain(), r.path()));
    assert!(r.as_str().starts_with(r.name()));
    assert!(
        r.tag().is_some() || r.digest().is_some(),
        "tag or digest always present"
    );
    assert!(!r.as_str().contains(char::is_whitespace));
    assert!(r.name().len() <= 255, "repository name bounded");
});
