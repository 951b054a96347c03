//! Questions asked on the terminal: a line read after a prompt, with the terminal's echo
//! turned off for secrets (unlock keys, registry passwords).

use std::io::{BufRead, IsTerminal, Write};

/// True if stdin is a terminal (a prompt can be answered).
pub fn interactive() -> bool {
    std::io::stdin().is_terminal()
}

/// Prints `prompt` (only when stdin is a terminal) and reads one line from stdin, without the
/// line end. With `secret`, the terminal does not echo what is typed. `Ok(None)` at end of
/// input.
pub fn read_line(prompt: &str, secret: bool) -> std::io::Result<Option<String>> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    let n = if stdin.is_terminal() {
        print!("{prompt}");
        std::io::stdout().flush()?;
        let echo = secret.then(EchoOff::new);
        let r = stdin.lock().read_line(&mut line);
        if echo.is_some() {
            drop(echo);
            println!();
        }
        r?
    } else {
        stdin.lock().read_line(&mut line)?
    };
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
}

/// Terminal echo turned off on stdin while it lives (`stty`, as this crate has no unsafe
/// code for termios).
struct EchoOff(bool);

impl EchoOff {
    fn new() -> EchoOff {
        EchoOff(stty("-echo"))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if self.0 {
            stty("echo");
        }
    }
}

fn stty(arg: &str) -> bool {
    std::process::Command::new("stty")
        .arg(arg)
        .stdin(std::process::Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}
