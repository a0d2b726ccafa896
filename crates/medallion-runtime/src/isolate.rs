//! Finding the records at fault when a stage fails a whole batch.
//!
//! A stage's transform fails as a unit: one record it cannot handle fails every record with
//! it. [`Bisect`] hands out pieces of the batch in input order; a piece that fails is split in
//! two and its halves are tried next, until the piece is a single record, which is the one at
//! fault. With k bad records among n, that is at most about 2·k·log2(n) extra runs, and the
//! pieces that pass come out in input order, so per-key order holds.

use std::collections::VecDeque;
use std::ops::Range;

/// The pieces still to try, front first.
#[derive(Debug)]
pub struct Bisect {
    pending: VecDeque<Range<usize>>,
}

impl Bisect {
    /// Starts on rows `0..rows`. The first piece is the whole batch.
    pub fn new(rows: usize) -> Self {
        let mut pending = VecDeque::new();
        if rows > 0 {
            pending.push_back(0..rows);
        }
        Self { pending }
    }

    /// The next piece to run, or `None` when every row is accounted for.
    pub fn next_piece(&mut self) -> Option<Range<usize>> {
        self.pending.pop_front()
    }

    /// `piece` (the one last handed out) failed. Returns the row at fault when the piece was a
    /// single row; otherwise its two halves are tried next, left first.
    pub fn failed(&mut self, piece: Range<usize>) -> Option<usize> {
        if piece.len() <= 1 {
            return Some(piece.start);
        }
        let middle = piece.start + piece.len() / 2;
        self.pending.push_front(middle..piece.end);
        self.pending.push_front(piece.start..middle);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs the bisection with "a piece fails iff it holds a poison row".
    fn run(rows: usize, poison: &[bool]) -> (Vec<Range<usize>>, Vec<usize>, usize) {
        let mut bisect = Bisect::new(rows);
        let (mut passed, mut at_fault, mut runs) = (Vec::new(), Vec::new(), 0);
        while let Some(piece) = bisect.next_piece() {
            runs += 1;
            if poison[piece.clone()].iter().any(|p| *p) {
                if let Some(row) = bisect.failed(piece) {
                    at_fault.push(row);
                }
            } else {
                passed.push(piece);
            }
        }
        (passed, at_fault, runs)
    }

    proptest! {
        #[test]
        fn exactly_the_poison_rows_are_at_fault_and_the_rest_pass_once_in_order(
            poison in prop::collection::vec(prop::bool::weighted(0.05), 1..600)
        ) {
            let rows = poison.len();
            let (passed, at_fault, runs) = run(rows, &poison);
            let want: Vec<usize> = (0..rows).filter(|i| poison[*i]).collect();
            prop_assert_eq!(&at_fault, &want);
            // Passed pieces and faulty rows tile 0..rows in order, each row once.
            let mut covered: Vec<usize> = passed.iter().flat_map(|r| r.clone()).collect();
            covered.extend(&at_fault);
            covered.sort_unstable();
            prop_assert_eq!(covered, (0..rows).collect::<Vec<_>>());
            prop_assert!(passed.windows(2).all(|w| w[0].end <= w[1].start));
            let k = want.len();
            let bound = 1 + 2 * k * (usize::BITS - rows.leading_zeros()) as usize;
            prop_assert!(runs <= bound, "{runs} runs for {k} poison rows of {rows}");
        }
    }

    #[test]
    fn a_clean_batch_is_one_run() {
        assert_eq!(run(100, &[false; 100]).2, 1);
        assert_eq!(Bisect::new(0).next_piece(), None);
    }
}
