//! `stewardctl completion bash|zsh|fish`: shell completion scripts, made by
//! `clap_complete` from the CLI's own definition (so they cannot fall
//! behind a new flag), and for bash and fish a small addition that
//! completes node ids and VIP names from the cluster: it calls the hidden
//! `stewardctl __complete nodes|vips`, which prints one name per line with
//! the connection settings of the environment and prints nothing (quickly)
//! when no cluster answers. zsh gets the static script.

use std::io::Write;

use clap::{CommandFactory, Parser};
use clap_complete::Shell;

use crate::ctl::Cli;

/// What `__complete` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    Nodes,
    Vips,
}

/// `stewardctl __complete nodes|vips`: not a clap subcommand (clap's
/// generated scripts would offer it), intercepted by the binary before
/// parsing. Connection settings come from the environment (STEWARD_*), as
/// in the shell being completed. Prints one name per line, or nothing at
/// all when anything fails: completion must never write an error into the
/// user's command line.
pub async fn complete_main(args: &[String]) {
    let names = match args.first().map(String::as_str) {
        Some("nodes") => Names::Nodes,
        Some("vips") => Names::Vips,
        _ => return,
    };
    let Ok(cli) = Cli::try_parse_from(["stewardctl", "status"]) else {
        return;
    };
    let lookup = crate::ctl::complete_names(&cli, names);
    if let Ok(Ok(list)) = tokio::time::timeout(std::time::Duration::from_secs(3), lookup).await {
        let mut out = std::io::stdout().lock();
        for name in list {
            let _ = writeln!(out, "{name}");
        }
    }
}

/// The subcommand paths whose next positional word is a node id or a VIP
/// name, for the dynamic part of the scripts.
const NODE_ARGS: [&str; 4] = ["node show", "node revoke", "role add", "role rm"];
const VIP_ARGS: [&str; 2] = ["vip move", "vip rm"];

/// Options of `stewardctl` that take a value (so that their value is not
/// taken for a subcommand word).
const VALUE_OPTIONS: &str = "--endpoints|--ca|--cert|--key|-o|--output|--timeout|-f|--file";

/// The script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "stewardctl", &mut out);
    match shell {
        Shell::Bash => out.extend_from_slice(bash_dynamic().as_bytes()),
        Shell::Fish => out.extend_from_slice(fish_dynamic().as_bytes()),
        _ => {}
    }
    out
}

fn bash_dynamic() -> String {
    let cases = |paths: &[&str]| {
        paths
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join("|")
    };
    format!(
        r#"
# Node ids and VIP names from the cluster (stewardctl __complete).
_stewardctl_names() {{
    local words=() i skip=0 w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        case "$w" in
            {VALUE_OPTIONS}) skip=1 ;;
            -*) ;;
            *) words+=("$w") ;;
        esac
    done
    local path="${{words[*]:0:2}}" kind=""
    if ((${{#words[@]}} == 2)); then
        case "$path" in
            {nodes}) kind=nodes ;;
            {vips}) kind=vips ;;
        esac
    elif ((${{#words[@]}} == 1)) && [[ "${{words[0]}}" == logs ]]; then
        kind=nodes
    fi
    if [[ -n "$kind" && "${{COMP_WORDS[COMP_CWORD]}}" != -* ]]; then
        COMPREPLY=($(compgen -W "$(stewardctl __complete "$kind" 2>/dev/null)" -- "${{COMP_WORDS[COMP_CWORD]}}"))
        return 0
    fi
    _stewardctl "$@"
}}
complete -F _stewardctl_names -o bashdefault -o default stewardctl
"#,
        nodes = cases(&NODE_ARGS),
        vips = cases(&VIP_ARGS),
    )
}

fn fish_dynamic() -> String {
    let mut out =
        String::from("\n# Node ids and VIP names from the cluster (stewardctl __complete).\n");
    for (paths, kind) in [(&NODE_ARGS[..], "nodes"), (&VIP_ARGS[..], "vips")] {
        for path in paths {
            let (group, sub) = path.split_once(' ').unwrap_or((path, ""));
            out.push_str(&format!(
                "complete -c stewardctl -f -n '__fish_seen_subcommand_from {group}; and __fish_seen_subcommand_from {sub}' -a '(stewardctl __complete {kind} 2>/dev/null)'\n"
            ));
        }
    }
    out.push_str(
        "complete -c stewardctl -f -n '__fish_seen_subcommand_from logs' -a '(stewardctl __complete nodes 2>/dev/null)'\n",
    );
    out
}

/// Prints the script for `shell` on stdout.
pub fn print_script(shell: Shell) -> std::io::Result<()> {
    std::io::stdout().write_all(&script(shell))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("utf-8");
            for word in ["apply", "nodes", "vip", "token", "completion"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
            assert!(
                !text.contains("__complete\""),
                "{shell}: the hidden helper is offered"
            );
        }
        let bash = String::from_utf8(script(Shell::Bash)).expect("utf-8");
        assert!(bash.contains(r#""node show"|"node revoke"|"role add"|"role rm") kind=nodes"#));
        let fish = String::from_utf8(script(Shell::Fish)).expect("utf-8");
        assert!(fish.contains("__fish_seen_subcommand_from vip; and __fish_seen_subcommand_from move' -a '(stewardctl __complete vips 2>/dev/null)'"));
    }
}
