//! Any bytes given as a `grubenv` block: parsing never panics, whatever parses re-encodes
//! to a block that parses to the same variables, and the boot state read from it obeys
//! the rule (never a bad slot, never a burnt trial) through a round of GRUB's bookkeeping.
#![no_main]

use juice_os::grubenv::{BLOCK_SIZE, Env, SIGNATURE};
use juice_os::select::BootState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Most random inputs lack the signature or the size: give both, keep the body.
    let mut block = SIGNATURE.to_vec();
    block.extend_from_slice(data);
    block.resize(BLOCK_SIZE, b'#');
    for input in [data, &block[..]] {
        let Ok(env) = Env::parse(input) else { continue };
        let again = env.to_block().expect("a parsed block fits again");
        assert_eq!(Env::parse(&again).expect("re-encoded block parses"), env);
        let Ok(mut state) = BootState::from_env(&env) else { continue };
        if let Some(c) = state.begin() {
            let f = state.slots[&c.slot];
            assert!(f.ok && (f.good || c.trial));
        }
        let mut out = env.clone();
        state.write_to(&mut out).expect("state names are valid");
        if let Ok(b) = out.to_block() {
            let back = BootState::from_env(&Env::parse(&b).expect("parses")).expect("valid");
            assert_eq!(back, state);
        }
    }
});
