//! Validation errors: every one names the object, its id, the field, the value and the reason,
//! and all of them are reported together.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// `security_group`, `security_group_rule`, `address_group`, `port` or `document`.
    pub object: &'static str,
    /// The object's id, or where it was found when it has none (`<file.json ports[2]>`).
    pub id: String,
    /// The offending field (`port_range_min`, `fixed_ips[0].ip_address`, ...).
    pub field: String,
    /// The offending value, as JSON.
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.object, self.id)?;
        if !self.field.is_empty() {
            write!(f, "{}={}: ", self.field, self.value)?;
        }
        f.write_str(&self.reason)
    }
}

/// Every problem found in an input. Nothing is applied when this is returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ValidationError> {
        self.0.iter()
    }

    pub(crate) fn push(
        &mut self,
        object: &'static str,
        id: &str,
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) {
        self.0.push(ValidationError {
            object,
            id: id.to_string(),
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        });
    }
}

/// One error per line.
impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a ValidationError;
    type IntoIter = std::slice::Iter<'a, ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A JSON value as it appears in an error message.
pub(crate) fn show(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".to_string())
}
