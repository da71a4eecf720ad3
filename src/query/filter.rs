//! The AIP-160 filter subset: a lexer and recursive-descent parser producing an [`Expr`]
//! tree. Precedence follows AIP-160: `OR` binds tighter than `AND`, and terms written side by
//! side are joined by `AND`. Turning the tree into SQL is [`super::sql`]'s job.

/// Limits that keep a hostile filter cheap to reject.
pub const MAX_FILTER_CHARS: usize = 2000;
pub const MAX_NESTING: usize = 16;

/// A parse or compile error, with the 1-based character position it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

impl FilterError {
    pub fn new(position: usize, message: impl Into<String>) -> Self {
        FilterError {
            position,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at position {})", self.message, self.position)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `:` — has / wildcard match.
    Has,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Has => ":",
        }
    }
}

/// A literal as written: quoted strings stay apart from bare words (numbers, booleans, enum
/// names), so each field can decide what it accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Word(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cmp {
        field: String,
        field_pos: usize,
        op: Op,
        value: Literal,
        value_pos: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Op(Op),
    Str(String),
    Word(String),
}

fn lex(input: &str) -> Result<Vec<(Tok, usize)>, FilterError> {
    let chars: Vec<char> = input.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((Tok::LParen, pos));
                i += 1;
            }
            ')' => {
                out.push((Tok::RParen, pos));
                i += 1;
            }
            '=' => {
                out.push((Tok::Op(Op::Eq), pos));
                i += 1;
            }
            ':' => {
                out.push((Tok::Op(Op::Has), pos));
                i += 1;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push((Tok::Op(Op::Ne), pos));
                i += 2;
            }
            '<' | '>' => {
                let eq = chars.get(i + 1) == Some(&'=');
                let op = match (c, eq) {
                    ('<', true) => Op::Le,
                    ('<', false) => Op::Lt,
                    (_, true) => Op::Ge,
                    _ => Op::Gt,
                };
                out.push((Tok::Op(op), pos));
                i += if eq { 2 } else { 1 };
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(FilterError::new(pos, "unterminated string")),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => match chars.get(i + 1) {
                            Some(e @ ('"' | '\\')) => {
                                s.push(*e);
                                i += 2;
                            }
                            _ => {
                                return Err(FilterError::new(
                                    i + 1,
                                    "invalid escape: only \\\" and \\\\ are allowed",
                                ));
                            }
                        },
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Str(s), pos));
            }
            c if is_word_char(c) => {
                let start = i;
                while i < chars.len() {
                    if chars[i] == '`' {
                        // A backtick-quoted metadata key (AIP-161), taken whole with its
                        // quotes; the field's resolver unquotes it.
                        let open = i + 1;
                        i += 1;
                        loop {
                            match chars.get(i) {
                                None => {
                                    return Err(FilterError::new(
                                        open,
                                        "backtick-quoted key is not closed",
                                    ));
                                }
                                Some('`') if chars.get(i + 1) == Some(&'`') => i += 2,
                                Some('`') => {
                                    i += 1;
                                    break;
                                }
                                Some(_) => i += 1,
                            }
                        }
                    } else if is_word_char(chars[i]) {
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((Tok::Word(chars[start..i].iter().collect()), pos));
            }
            other => {
                return Err(FilterError::new(
                    pos,
                    format!("unexpected character '{other}'"),
                ));
            }
        }
    }
    Ok(out)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '+' | '*')
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
    end_pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(t, _)| t)
    }

    fn pos(&self) -> usize {
        self.toks
            .get(self.at)
            .map(|(_, p)| *p)
            .unwrap_or(self.end_pos)
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w == kw)
    }

    fn enter(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(FilterError::new(
                self.pos(),
                format!("nesting deeper than {MAX_NESTING}"),
            ));
        }
        Ok(())
    }

    // expression := sequence { "AND" sequence }
    fn expression(&mut self) -> Result<Expr, FilterError> {
        let mut parts = vec![self.sequence()?];
        while self.is_keyword("AND") {
            self.at += 1;
            parts.push(self.sequence()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::And(parts)
        })
    }

    // sequence := factor { factor }   (implicit AND)
    fn sequence(&mut self) -> Result<Expr, FilterError> {
        let mut parts = vec![self.factor()?];
        while let Some(t) = self.peek() {
            if *t == Tok::RParen || self.is_keyword("AND") {
                break;
            }
            parts.push(self.factor()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::And(parts)
        })
    }

    // factor := term { "OR" term }
    fn factor(&mut self) -> Result<Expr, FilterError> {
        let mut parts = vec![self.term()?];
        while self.is_keyword("OR") {
            self.at += 1;
            parts.push(self.term()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::Or(parts)
        })
    }

    // term := "NOT" term | "(" expression ")" | comparison
    fn term(&mut self) -> Result<Expr, FilterError> {
        if self.is_keyword("NOT") {
            self.at += 1;
            self.enter()?;
            let inner = self.term()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        if self.peek() == Some(&Tok::LParen) {
            let open = self.pos();
            self.at += 1;
            self.enter()?;
            let inner = self.expression()?;
            self.depth -= 1;
            if self.peek() != Some(&Tok::RParen) {
                return Err(FilterError::new(
                    self.pos(),
                    format!("expected ')' to close the '(' at position {open}"),
                ));
            }
            self.at += 1;
            return Ok(inner);
        }
        self.comparison()
    }

    // comparison := FIELD OP VALUE
    fn comparison(&mut self) -> Result<Expr, FilterError> {
        let field_pos = self.pos();
        let field = match self.peek() {
            Some(Tok::Word(w)) if !matches!(w.as_str(), "AND" | "OR" | "NOT") => w.clone(),
            Some(Tok::RParen) => return Err(FilterError::new(field_pos, "unexpected ')'")),
            Some(_) => return Err(FilterError::new(field_pos, "expected a field name")),
            None => return Err(FilterError::new(field_pos, "expected a comparison")),
        };
        self.at += 1;
        let op = match self.peek() {
            Some(Tok::Op(op)) => *op,
            _ => {
                return Err(FilterError::new(
                    self.pos(),
                    format!("expected an operator (= != < <= > >= :) after '{field}'"),
                ));
            }
        };
        self.at += 1;
        let value_pos = self.pos();
        let value = match self.peek() {
            Some(Tok::Str(s)) => Literal::Str(s.clone()),
            Some(Tok::Word(w)) => Literal::Word(w.clone()),
            _ => return Err(FilterError::new(value_pos, "expected a value")),
        };
        self.at += 1;
        Ok(Expr::Cmp {
            field,
            field_pos,
            op,
            value,
            value_pos,
        })
    }
}

/// Parses a filter; `None` for an empty (all-whitespace) filter.
pub fn parse(input: &str) -> Result<Option<Expr>, FilterError> {
    let n = input.chars().count();
    if n > MAX_FILTER_CHARS {
        return Err(FilterError::new(
            MAX_FILTER_CHARS + 1,
            format!("filter is longer than {MAX_FILTER_CHARS} characters"),
        ));
    }
    let toks = lex(input)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser {
        toks,
        at: 0,
        end_pos: n + 1,
        depth: 0,
    };
    let expr = p.expression()?;
    if p.at < p.toks.len() {
        return Err(FilterError::new(p.pos(), "unexpected input"));
    }
    Ok(Some(expr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(field: &str, op: Op, value: Literal) -> Expr {
        Expr::Cmp {
            field: field.into(),
            field_pos: 0,
            op,
            value,
            value_pos: 0,
        }
    }

    /// Positions make exact trees noisy to write; compare with positions zeroed.
    fn strip(e: Expr) -> Expr {
        match e {
            Expr::And(v) => Expr::And(v.into_iter().map(strip).collect()),
            Expr::Or(v) => Expr::Or(v.into_iter().map(strip).collect()),
            Expr::Not(b) => Expr::Not(Box::new(strip(*b))),
            Expr::Cmp {
                field, op, value, ..
            } => cmp(&field, op, value),
        }
    }

    fn p(s: &str) -> Expr {
        strip(parse(s).unwrap().unwrap())
    }

    #[test]
    fn or_binds_tighter_than_and() {
        assert_eq!(
            p(r#"a = 1 AND b = 2 OR c = 3"#),
            Expr::And(vec![
                cmp("a", Op::Eq, Literal::Word("1".into())),
                Expr::Or(vec![
                    cmp("b", Op::Eq, Literal::Word("2".into())),
                    cmp("c", Op::Eq, Literal::Word("3".into())),
                ]),
            ])
        );
    }

    #[test]
    fn implicit_and_not_and_parentheses() {
        assert_eq!(
            p(r#"NOT (email:"*@x.io") status = BLOCKED"#),
            Expr::And(vec![
                Expr::Not(Box::new(cmp(
                    "email",
                    Op::Has,
                    Literal::Str("*@x.io".into())
                ))),
                cmp("status", Op::Eq, Literal::Word("BLOCKED".into())),
            ])
        );
    }

    #[test]
    fn strings_keep_escaped_quotes_as_data() {
        assert_eq!(
            p(r#"email = "x\" OR 1=1 --""#),
            cmp("email", Op::Eq, Literal::Str("x\" OR 1=1 --".into()))
        );
    }

    #[test]
    fn errors_name_their_position() {
        assert_eq!(parse("email = ").unwrap_err().position, 9);
        assert_eq!(parse(r#"email = "abc"#).unwrap_err().position, 9);
        assert_eq!(parse("(a = 1").unwrap_err().position, 7);
        assert_eq!(parse("a = 1 )").unwrap_err().position, 7);
        assert_eq!(parse("a ; 1").unwrap_err().position, 3);
        assert!(parse(&"(".repeat(10_000)).is_err());
        assert!(parse(&format!("{}a = 1{}", "(".repeat(17), ")".repeat(17))).is_err());
        assert!(parse(&format!("{}a = 1{}", "(".repeat(16), ")".repeat(16))).is_ok());
        assert!(parse(&"a".repeat(2001)).is_err());
    }

    #[test]
    fn backtick_quoted_keys_stay_in_their_field_name() {
        assert_eq!(
            p(r#"app_metadata.`example.com/a b = "c"`.x = "v" OR app_metadata.`it``s`:*"#),
            Expr::Or(vec![
                cmp(
                    r#"app_metadata.`example.com/a b = "c"`.x"#,
                    Op::Eq,
                    Literal::Str("v".into())
                ),
                cmp("app_metadata.`it``s`", Op::Has, Literal::Word("*".into())),
            ])
        );
        assert_eq!(
            parse("app_metadata.`open = 1").unwrap_err().position,
            14,
            "the opening backtick"
        );
    }

    #[test]
    fn empty_filter_is_none() {
        assert_eq!(parse("   ").unwrap(), None);
    }
}
