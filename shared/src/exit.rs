//! The exit codes of every Baton binary (`baton`, the daemons, the test and
//! benchmark tools), defined once here and documented in the README.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success: the command did what it said, or the daemon stopped cleanly |
//! | 1 | the work failed: a run failed, was rolled back, cancelled or superseded; a one-shot task failed |
//! | 2 | bad input: usage, configuration (the message names the key) or a request the API refused |
//! | 3 | unavailable: the broker, database or API cannot be reached, or the runtime stopped |

use std::process::ExitCode;

/// One row of the table above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    Failed = 1,
    BadInput = 2,
    Unavailable = 3,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}
