//! The trace of a scenario run: `[  12.500s] …` lines, kept in one growing buffer (a run of 100,000
//! steps writes some 250,000 lines: one allocation per line cost more than writing them).

use std::fmt::Write as _;

use crate::clock::Timestamp;

/// About the length of a trace line, to size the buffer.
const LINE_BYTES: usize = 64;

/// The lines of a run, in order. A line may itself contain a newline (an error message quoted
/// whole); [`Trace::lines`] gives the lines as they were logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    text: String,
    /// Where each line ends in `text`.
    ends: Vec<usize>,
}

impl Trace {
    /// An empty trace with room for about `lines` lines (a run writes two or three per step).
    pub fn with_capacity(lines: usize) -> Self {
        Trace {
            text: String::with_capacity(lines.saturating_mul(LINE_BYTES)),
            ends: Vec::with_capacity(lines),
        }
    }

    /// Appends `[  12.500s] text`.
    pub fn push(&mut self, at: Timestamp, text: impl std::fmt::Display) {
        self.push_with(at, |line| {
            let _ = write!(line, "{text}");
        });
    }

    /// Appends `[  12.500s] ` and what `write` writes after it, straight into the buffer.
    pub fn push_with(&mut self, at: Timestamp, write: impl FnOnce(&mut String)) {
        write_time(&mut self.text, at);
        write(&mut self.text);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn lines(&self) -> impl Iterator<Item = &str> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.text[start..end])
    }

    /// The lines joined with `\n` (no newline after the last).
    pub fn joined(&self) -> String {
        let mut s = String::with_capacity(self.text.len() + self.ends.len());
        for (i, line) in self.lines().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(line);
        }
        s
    }

    pub fn to_lines(&self) -> Vec<String> {
        self.lines().map(str::to_string).collect()
    }
}

/// One trace line: `[  12.500s] text`.
pub fn trace_line(at: Timestamp, text: &str) -> String {
    let mut line = String::with_capacity(64);
    write_time(&mut line, at);
    line.push_str(text);
    line
}

/// `[{:>9}] ` of the time's `Display` (`90.500s`), written digit by digit (the formatter's padding
/// costs more than the rest of a line): the seconds padded to 4 make the 9 columns (longer ones
/// overflow the same way).
fn write_time(line: &mut String, at: Timestamp) {
    let (mut secs, millis) = (at.0.as_secs(), at.0.subsec_millis());
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (secs % 10) as u8;
        n += 1;
        secs /= 10;
        if secs == 0 {
            break;
        }
    }
    line.push('[');
    for _ in n..4 {
        line.push(' ');
    }
    line.extend(digits[..n].iter().rev().map(|&d| char::from(d)));
    line.push('.');
    for d in [millis / 100, millis / 10 % 10, millis % 10] {
        line.push(char::from(b'0' + d as u8));
    }
    line.push_str("s] ");
}
