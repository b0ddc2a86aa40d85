//! Conversations: roles and the order they may come in.

use crate::error::{EngineError, Result};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the assistant; at most one, first.
    System,
    /// The human side.
    User,
    /// The model side; the conversation ends with the assistant response being scored.
    Assistant,
}

impl Role {
    /// Parses `system`, `user` or `assistant` (the names chat templates use).
    pub fn parse(s: &str) -> Result<Role> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(EngineError::InvalidInput(format!(
                "unknown role {other:?}; roles are \"system\", \"user\" and \"assistant\""
            ))),
        }
    }

    /// The role's name as chat templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said, verbatim.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into() }
    }
}

/// Checks that a conversation can be scored: not empty, an optional system message first, then
/// user and assistant turns alternating from a user turn, ending with the assistant response
/// to score. Errors name the offending message by index.
pub fn validate_roles(messages: &[Message]) -> Result<()> {
    let bad = |m: String| Err(EngineError::InvalidInput(m));
    if messages.is_empty() {
        return bad("the conversation has no messages".into());
    }
    let start = usize::from(messages[0].role == Role::System);
    if start == messages.len() {
        return bad("the conversation has only a system message; it needs a user turn and an assistant response".into());
    }
    for (i, m) in messages.iter().enumerate().skip(start) {
        let expected = if (i - start) % 2 == 0 { Role::User } else { Role::Assistant };
        if m.role == Role::System {
            return bad(format!("messages[{i}]: a system message may only come first"));
        }
        if m.role != expected {
            return bad(format!(
                "messages[{i}]: expected a {} turn, found {} (user and assistant turns alternate, starting with user)",
                expected.as_str(),
                m.role.as_str()
            ));
        }
    }
    if messages.last().map(|m| m.role) != Some(Role::Assistant) {
        return bad(format!(
            "messages[{}]: the conversation must end with the assistant response to score, found a user turn",
            messages.len() - 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(roles: &[Role]) -> Vec<Message> {
        roles.iter().map(|&r| Message::new(r, "x")).collect()
    }

    #[test]
    fn valid_orders() {
        use Role::*;
        for roles in [&[User, Assistant][..], &[System, User, Assistant], &[User, Assistant, User, Assistant]] {
            validate_roles(&conv(roles)).unwrap();
        }
    }

    #[test]
    fn invalid_orders_name_the_message() {
        use Role::*;
        let cases: &[(&[Role], &str)] = &[
            (&[], "no messages"),
            (&[System], "only a system message"),
            (&[User], "messages[0]: the conversation must end with the assistant"),
            (&[Assistant], "messages[0]: expected a user turn, found assistant"),
            (&[User, User, Assistant], "messages[1]: expected a assistant turn, found user"),
            (&[User, Assistant, System, User, Assistant], "messages[2]: a system message may only come first"),
            (&[System, User, Assistant, User], "messages[3]: the conversation must end"),
        ];
        for (roles, want) in cases {
            let e = validate_roles(&conv(roles)).unwrap_err().to_string();
            assert!(e.contains(want), "{roles:?}: {e}");
        }
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::parse("assistant").unwrap(), Role::Assistant);
        let e = Role::parse("tool").unwrap_err().to_string();
        assert!(e.contains("\"tool\""), "{e}");
    }
}
