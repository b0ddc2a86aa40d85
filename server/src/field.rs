//! One shape for "this field of the input is wrong", shared by every front end that reads JSON
//! (the classify and OpenRLHF HTTP APIs, `arbiter score` lines): the field's path, then what is
//! wrong, as `messages[1].role: must be a string`. gRPC messages use the same `path: message`
//! form (`items[3].messages[1]: ...`, see crate::service).

/// An input field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if param.is_empty() { String::new() } else { format!("{param}: ") })]
pub struct BadField {
    /// Its path in the input (`input[2]`, `messages[1].content`); empty when the whole input is
    /// at fault (not JSON, not an object).
    pub param: String,
    /// What is wrong with it.
    pub message: String,
}

impl BadField {
    /// `param` is wrong: `message`.
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        BadField { param: param.into(), message: message.into() }
    }

    /// The whole input is wrong: `message`.
    pub fn whole(message: impl Into<String>) -> Self {
        Self::new("", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_named_before_its_problem_and_a_whole_input_is_not() {
        assert_eq!(
            BadField::new("messages[1].role", "must be a string").to_string(),
            "messages[1].role: must be a string"
        );
        assert_eq!(BadField::whole("not valid JSON: EOF").to_string(), "not valid JSON: EOF");
    }
}
