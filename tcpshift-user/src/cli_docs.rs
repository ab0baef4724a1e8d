//! Manual pages and shell completions, generated from the binaries' own clap definitions.
//!
//! Each binary parses its command line with [`parse`] (or [`try_parse`]) instead of
//! `Parser::parse`, which adds two things to its clap definition:
//!
//! - a command with subcommands (`tcpshiftctl`) gets `completion SHELL`, printing the
//!   completion script for bash, zsh, fish, elvish or PowerShell, and a hidden
//!   `generate-docs DIR`;
//! - a command without subcommands (`tcpshiftd`, `tcp-echo`) gets a hidden
//!   `--generate-docs DIR`.
//!
//! `generate-docs DIR` writes the manual pages to `DIR/man1/` (one page per command and one
//! per subcommand, e.g. `tcpshiftctl-set-weight.1`) and the completion scripts to
//! `DIR/completions/{bash,zsh,fish}/` under the names those shells look for. `cargo xtask
//! package` runs it on the release binaries, so the pages always match the options.

use std::{
    ffi::OsString,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, ArgMatches, Command, Parser, value_parser};
use clap_complete::Shell;

/// Name of the hidden option or subcommand that writes manual pages and completions.
pub const GENERATE_DOCS: &str = "generate-docs";
/// Name of the subcommand that prints a completion script.
pub const COMPLETION: &str = "completion";

/// What went wrong writing the documentation files.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source} (is the directory writable?)")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// The shells whose completion scripts [`write_docs`] writes (those Debian packages ship).
pub const PACKAGED_SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `cmd` with the documentation commands added (see the module documentation).
pub fn with_doc_commands(cmd: Command) -> Command {
    let dir_arg = |arg: Arg| {
        arg.value_name("DIR")
            .value_parser(value_parser!(PathBuf))
            .help("Write the manual pages to DIR/man1 and the shell completions to DIR/completions")
    };
    if cmd.has_subcommands() {
        cmd.subcommand(
            Command::new(COMPLETION)
                .about("Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell)")
                .long_about(
                    "Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).\n\n\
                     Installed packages already provide them for bash, zsh and fish; by hand, e.g.:\n  \
                     tcpshiftctl completion bash > ~/.local/share/bash-completion/completions/tcpshiftctl",
                )
                .arg(
                    Arg::new("shell")
                        .value_name("SHELL")
                        .required(true)
                        .value_parser(value_parser!(Shell)),
                ),
        )
        .subcommand(
            Command::new(GENERATE_DOCS)
                .hide(true)
                .about("Write the manual pages and shell completions (for packaging)")
                .arg(dir_arg(Arg::new(GENERATE_DOCS)).required(true)),
        )
    } else {
        cmd.arg(
            dir_arg(Arg::new(GENERATE_DOCS))
                .long(GENERATE_DOCS)
                .hide(true)
                .action(ArgAction::Set)
                .exclusive(true),
        )
    }
}

/// Parses the process's command line as `T`, after handling the documentation commands (which
/// print or write their output and exit). Exits with clap's message on a usage error, like
/// `Parser::parse`.
pub fn parse<T: Parser>() -> T {
    try_parse().unwrap_or_else(|e| e.exit())
}

/// Like [`parse`], but returns usage errors (and `--help`/`--version`, as clap does) instead
/// of exiting on them.
pub fn try_parse<T: Parser>() -> Result<T, clap::Error> {
    try_parse_from(std::env::args_os())
}

/// [`try_parse`] on the given arguments (the first one is the program name).
pub fn try_parse_from<T: Parser>(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<T, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // Named after the program as invoked (`tcpshiftd`, not the crate), as in its usage line.
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let mut cmd = with_doc_commands(T::command());
    if let Some(program) = program {
        cmd = cmd.name(program);
    }
    // The documentation is made from the definition before parsing adds `help` to it.
    let unparsed = cmd.clone();
    let mut matches = cmd.try_get_matches_from_mut(args)?;
    if let Some(outcome) = doc_command(&unparsed, &matches) {
        let name = cmd.get_name().to_owned();
        match outcome {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("{name}: error: {e}");
                std::process::exit(1);
            }
        }
    }
    T::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))
}

/// Runs the documentation command `matches` asks for, if any.
fn doc_command(cmd: &Command, matches: &ArgMatches) -> Option<Result<(), DocsError>> {
    match matches.subcommand() {
        Some((COMPLETION, m)) => {
            let shell = *m.get_one::<Shell>("shell")?;
            let mut cmd = cmd.clone();
            let name = cmd.get_name().to_owned();
            let mut out = io::stdout().lock();
            clap_complete::generate(shell, &mut cmd, name, &mut out);
            Some(out.flush().map_err(|source| DocsError::Write {
                path: PathBuf::from("<stdout>"),
                source,
            }))
        }
        Some((GENERATE_DOCS, m)) => {
            let dir = m.get_one::<PathBuf>(GENERATE_DOCS)?;
            Some(write_docs(cmd, dir).map(drop))
        }
        _ => {
            let dir = matches.try_get_one::<PathBuf>(GENERATE_DOCS).ok()??;
            Some(write_docs(cmd, dir).map(drop))
        }
    }
}

/// Writes the manual pages of `cmd` and its visible subcommands to `dir/man1/` (`NAME.1`,
/// `NAME-SUBCOMMAND.1`) and its bash, zsh and fish completions to `dir/completions/SHELL/`;
/// returns the files written, manual pages first, each group sorted.
pub fn write_docs(cmd: &Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let man = dir.join("man1");
    create_dir(&man)?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DocsError::Write { path, source }
    };
    clap_mangen::generate_to(cmd.clone(), &man).map_err(write_err(&man))?;
    let mut written = fs::read_dir(&man)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.path()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(write_err(&man))?;
    written.sort();
    let mut cmd = cmd.clone();
    let name = cmd.get_name().to_owned();
    for shell in PACKAGED_SHELLS {
        let shell_dir = dir.join("completions").join(shell.to_string());
        create_dir(&shell_dir)?;
        let path = clap_complete::generate_to(shell, &mut cmd, &name, &shell_dir)
            .map_err(write_err(&shell_dir))?;
        written.push(path);
    }
    Ok(written)
}

fn create_dir(dir: &Path) -> Result<(), DocsError> {
    fs::create_dir_all(dir).map_err(|source| DocsError::Write {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A command with subcommands, like tcpshiftctl.
    #[derive(Parser, Debug, PartialEq)]
    #[command(name = "demo-ctl")]
    struct Ctl {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand, Debug, PartialEq)]
    enum Sub {
        /// Show things.
        Status {
            /// As JSON.
            #[arg(long)]
            json: bool,
        },
    }

    /// A command without subcommands and with required arguments, like tcp-echo.
    #[derive(Parser, Debug, PartialEq)]
    #[command(name = "demo-echo")]
    struct Echo {
        /// Ports.
        ports: String,
        /// Prefix.
        prefix: String,
    }

    #[test]
    fn ordinary_command_lines_parse_as_before() {
        let ctl: Ctl = try_parse_from(["demo-ctl", "status", "--json"]).expect("parses");
        assert_eq!(ctl.command, Sub::Status { json: true });
        let echo: Echo = try_parse_from(["demo-echo", "9000", "one"]).expect("parses");
        assert_eq!(echo.prefix, "one");
        let err = try_parse_from::<Echo>(["demo-echo", "9000"]).expect_err("prefix missing");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn completion_is_a_visible_subcommand_and_generate_docs_is_hidden() {
        let mut cmd = with_doc_commands(Ctl::command());
        let help = cmd.render_help().to_string();
        assert!(help.contains("completion"), "{help}");
        assert!(!help.contains(GENERATE_DOCS), "{help}");
        let mut echo = with_doc_commands(Echo::command());
        let help = echo.render_long_help().to_string();
        assert!(!help.contains(GENERATE_DOCS), "{help}");
    }

    #[test]
    fn generate_docs_needs_no_other_argument() {
        let cmd = with_doc_commands(Echo::command());
        let m = cmd
            .try_get_matches_from(["demo-echo", "--generate-docs", "/tmp/x"])
            .expect("--generate-docs alone is accepted");
        assert_eq!(
            m.get_one::<PathBuf>(GENERATE_DOCS),
            Some(&PathBuf::from("/tmp/x"))
        );
    }

    #[test]
    fn writes_a_page_per_subcommand_and_three_completions() {
        let dir = std::env::temp_dir().join(format!("tcpshift-cli-docs-{}", std::process::id()));
        let written = write_docs(&with_doc_commands(Ctl::command()), &dir).expect("written");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap_or(p).display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "man1/demo-ctl-completion.1",
                "man1/demo-ctl-status.1",
                "man1/demo-ctl.1",
                "completions/bash/demo-ctl.bash",
                "completions/zsh/_demo-ctl",
                "completions/fish/demo-ctl.fish",
            ]
        );
        let page = fs::read_to_string(dir.join("man1/demo-ctl-status.1")).expect("page");
        assert!(page.contains("As JSON"), "{page}");
        let bash = fs::read_to_string(dir.join("completions/bash/demo-ctl.bash")).expect("bash");
        assert!(
            bash.contains("status") && bash.contains("completion"),
            "{bash}"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
