//! `tca counterexample`'s search: the literal reading's witness from a fixed seed is
//! pinned, reached in under a minute, and shrinks to d = 2 (d = 1 cannot violate it);
//! the same search on a true reading finds nothing.

use std::time::Instant;
use tca::bound::counterexample::{search, Outcome};
use tca::bound::Reading;

#[test]
fn seed_zero_gives_the_pinned_two_dimensional_witness() {
    let start = Instant::now();
    let Outcome::Found {
        case, audit, keys, ..
    } = search(Reading::L1Entrymax, 0, 20_000).unwrap()
    else {
        panic!("no counterexample to the literal reading");
    };
    assert!(start.elapsed().as_secs() < 60);
    let (q, k, v) = case.heads.tensors();
    assert_eq!(
        (case.heads.dim(), case.heads.len(), case.heads.num_q_heads()),
        (2, 3, 1)
    );
    assert_eq!((case.block, case.window, case.keep), (2, 1, 1));
    assert!(
        q.iter().chain(k.iter()).all(|&x| x == 0.0),
        "uniform attention"
    );
    assert_eq!(v.iter().copied().collect::<Vec<_>>(), PINNED_V.to_vec());
    assert_eq!((audit.query, keys), (2, vec![0, 2]));
    assert!((audit.gamma - 1.0 / 3.0).abs() < 1e-15);
    assert!(audit.err_l1 > 2.0 * audit.gamma * audit.vmax_abs + 0.1);
    // The same seed gives the same witness.
    let Outcome::Found { case: again, .. } = search(Reading::L1Entrymax, 0, 20_000).unwrap() else {
        panic!()
    };
    assert_eq!(again, case);
}

/// v of the witness, row-major [1, 3, 2].
const PINNED_V: [f64; 6] = [0.0, 0.0, 1.0, 1.0, 0.0, -1.0];

#[test]
fn true_readings_survive_the_same_search() {
    for r in [
        Reading::Identity,
        Reading::LinfEntrymax,
        Reading::L1Induced,
        Reading::L2Diameter,
    ] {
        match search(r, 0, 5_000).unwrap() {
            Outcome::NotFound { tried } => assert_eq!(tried, 5_000),
            Outcome::Found { case, audit, .. } => panic!("{r:?} violated: {case:?} {audit:?}"),
        }
    }
}
