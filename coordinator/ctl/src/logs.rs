//! `stewardctl logs NODE`: asks the replica that serves the node's session
//! (the admin API reads a journal only through a live session there) and
//! prints the lines as they come, control characters made harmless: a
//! journal line is the node's text, and must not drive the terminal.

use std::io::Write;

use steward_proto::domain::{LogChunk, LogQuery};
use steward_proto::pb;

use crate::ctl::{connect_to, Cli, CtlError, Output};

/// `line` with every control character but a tab shown as `?`.
pub fn harmless(line: &str) -> String {
    line.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

pub async fn print_logs(cli: &Cli, node: &str, query: LogQuery) -> Result<(), CtlError> {
    let mut client = connect_to(cli, &cli.endpoints).await?;
    let view = client
        .get_node(pb::GetNodeRequest {
            node_id: node.to_owned(),
        })
        .await?
        .into_inner();
    if view.replica.is_empty() {
        return Err(CtlError::Rpc(format!(
            "node {node} is not connected: its journal cannot be read now"
        )));
    }
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    let address = status
        .replicas
        .iter()
        .find(|r| r.id == view.replica)
        .map(|r| r.address.clone())
        .ok_or_else(|| {
            CtlError::Rpc(format!(
                "node {node} is served by replica {}, which is not listed as a member",
                view.replica
            ))
        })?;
    let mut client = if status.served_by == view.replica {
        client
    } else {
        connect_to(cli, &[address]).await?
    };
    let mut stream = client
        .logs(pb::LogsRequest {
            node_id: node.to_owned(),
            query: Some(query.into()),
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await? {
        let chunk = LogChunk::try_from(chunk)?;
        for line in &chunk.lines {
            let written = match cli.output {
                Output::Json => {
                    writeln!(out, "{}", serde_json::json!({"node": node, "line": line}))
                }
                Output::Table => writeln!(out, "{}", harmless(line)),
            };
            if written.is_err() {
                // The reader went away (a closed pipe): stop quietly.
                return Ok(());
            }
        }
        let _ = out.flush();
        if chunk.done {
            return match chunk.error {
                Some(error) => Err(CtlError::Rpc(format!("{node}: {}", harmless(&error)))),
                None => Ok(()),
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(
            harmless("ok\tx\x1b]52;c;ZXZpbA==\x07\x1b[2J\r"),
            "ok\tx?]52;c;ZXZpbA==??[2J?"
        );
    }
}
