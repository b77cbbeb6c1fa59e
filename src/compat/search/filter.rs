//! The MongoDB-style filter subset that bk-cmdb clients send as a search `condition`,
//! evaluated over JSON records in memory.
//!
//! Semantics follow MongoDB where it matters to clients: keys are ANDed, dotted paths reach
//! into objects, equality against an array field matches any element, `{"a": null}` and
//! `$ne`/`$nin` also match a missing field. Values of different JSON types are never equal
//! and never ordered; numbers compare numerically (1 == 1.0).

use crate::compat::codes::ApiError;
use regex::{Regex, RegexBuilder};
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// What one condition may cost, so that a request's memory is bounded whatever it holds
/// (the body limit alone does not bound compiled regexes). Beyond a limit the condition
/// is 1199006 naming it.
pub const MAX_REGEX_TERMS: usize = 8;
/// Compiled-program and lazy-DFA cache caps per `$regex`: with `MAX_REGEX_TERMS`, at most
/// 10 MiB of regex memory per request. (`\w` alone is a large Unicode class: `\w{20}`
/// compiles to most of a MiB.)
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const REGEX_DFA_LIMIT: usize = 256 << 10;
/// Nesting of `$and`/`$or` documents.
pub const MAX_DEPTH: usize = 16;
/// Field tests and clauses, `$in`/`$nin` elements included.
pub const MAX_TERMS: usize = 1024;

/// What is left of a condition's allowance while it is parsed.
struct Budget {
    regexes: usize,
    terms: usize,
}

impl Budget {
    fn term(&mut self, count: usize) -> Result<(), ApiError> {
        self.terms = self
            .terms
            .checked_sub(count)
            .ok_or_else(|| ApiError::invalid_because("condition", format!("more than {MAX_TERMS} terms")))?;
        Ok(())
    }

    fn regex(&mut self) -> Result<(), ApiError> {
        self.regexes = self.regexes.checked_sub(1).ok_or_else(|| {
            ApiError::invalid_because("condition", format!("more than {MAX_REGEX_TERMS} $regex terms"))
        })?;
        Ok(())
    }
}

/// A parsed search condition.
#[derive(Clone, Debug)]
pub struct Filter(Node);

#[derive(Clone, Debug)]
enum Node {
    /// Every clause matches; an empty list matches everything.
    All(Vec<Node>),
    /// At least one clause matches.
    Any(Vec<Node>),
    Field {
        path: Vec<String>,
        test: Test,
    },
}

#[derive(Clone, Debug)]
enum Test {
    Eq(Value),
    Ne(Value),
    Range(Bound, Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Regex(Regex),
    Exists(bool),
}

#[derive(Clone, Copy, Debug)]
enum Bound {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Default for Filter {
    /// Matches every record: the condition of a search that gives none.
    fn default() -> Self {
        Filter(Node::All(Vec::new()))
    }
}

impl Filter {
    /// Parses a condition object. Unsupported operators, malformed operands and regexes that
    /// do not compile are 1199006 naming the operator (or `condition` for a non-object).
    pub fn parse(condition: &Value) -> Result<Filter, ApiError> {
        let mut budget = Budget { regexes: MAX_REGEX_TERMS, terms: MAX_TERMS };
        match condition {
            Value::Object(document) => parse_document(document, 0, &mut budget).map(Filter),
            _ => Err(ApiError::invalid("condition")),
        }
    }

    pub fn matches(&self, record: &Value) -> bool {
        self.0.matches(record)
    }

    /// ANDs `bk_supplier_account == account` into the filter, so a search never leaves the
    /// caller's supplier account whatever its condition says.
    pub fn force_owner(&mut self, account: &str) {
        let owner = Node::Field {
            path: vec!["bk_supplier_account".to_string()],
            test: Test::Eq(Value::String(account.to_string())),
        };
        let user = std::mem::replace(&mut self.0, Node::All(Vec::new()));
        self.0 = Node::All(vec![user, owner]);
    }
}

fn parse_document(document: &Map<String, Value>, depth: usize, budget: &mut Budget) -> Result<Node, ApiError> {
    if depth > MAX_DEPTH {
        return Err(ApiError::invalid_because("condition", format!("nested deeper than {MAX_DEPTH}")));
    }
    let mut clauses = Vec::new();
    for (key, value) in document {
        budget.term(1)?;
        match key.as_str() {
            "$and" => clauses.push(Node::All(parse_clause_list("$and", value, depth, budget)?)),
            "$or" => clauses.push(Node::Any(parse_clause_list("$or", value, depth, budget)?)),
            operator if operator.starts_with('$') => return Err(ApiError::invalid(operator)),
            path => clauses.extend(parse_field(path, value, budget)?),
        }
    }
    Ok(match clauses.len() {
        1 => clauses.remove(0),
        _ => Node::All(clauses),
    })
}

/// `$and`/`$or` take a non-empty array of condition objects, as in MongoDB.
fn parse_clause_list(operator: &str, value: &Value, depth: usize, budget: &mut Budget) -> Result<Vec<Node>, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid(operator));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(operator));
    }
    items
        .iter()
        .map(|item| match item {
            Value::Object(document) => parse_document(document, depth + 1, budget),
            _ => Err(ApiError::invalid(operator)),
        })
        .collect()
}

fn parse_field(path: &str, value: &Value, budget: &mut Budget) -> Result<Vec<Node>, ApiError> {
    let segments: Vec<String> = path.split('.').map(str::to_string).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ApiError::invalid(path));
    }
    let tests = match value {
        Value::Object(operators) if operators.keys().any(|k| k.starts_with('$')) => parse_operators(operators, budget)?,
        literal => vec![Test::Eq(literal.clone())],
    };
    Ok(tests.into_iter().map(|test| Node::Field { path: segments.clone(), test }).collect())
}

fn parse_operators(operators: &Map<String, Value>, budget: &mut Budget) -> Result<Vec<Test>, ApiError> {
    let mut tests = Vec::new();
    for (operator, operand) in operators {
        budget.term(1)?;
        let test = match operator.as_str() {
            "$eq" => Test::Eq(operand.clone()),
            "$ne" => Test::Ne(operand.clone()),
            "$gt" => Test::Range(Bound::Gt, operand.clone()),
            "$gte" => Test::Range(Bound::Gte, operand.clone()),
            "$lt" => Test::Range(Bound::Lt, operand.clone()),
            "$lte" => Test::Range(Bound::Lte, operand.clone()),
            "$in" => Test::In(parse_list("$in", operand, budget)?),
            "$nin" => Test::Nin(parse_list("$nin", operand, budget)?),
            "$exists" => Test::Exists(parse_exists(operand)?),
            "$regex" => {
                budget.regex()?;
                Test::Regex(parse_regex(operand, operators.get("$options"))?)
            }
            "$options" if operators.contains_key("$regex") => continue,
            other => return Err(ApiError::invalid(other)),
        };
        tests.push(test);
    }
    Ok(tests)
}

fn parse_list(operator: &str, operand: &Value, budget: &mut Budget) -> Result<Vec<Value>, ApiError> {
    match operand {
        Value::Array(values) => {
            budget.term(values.len())?;
            Ok(values.clone())
        }
        _ => Err(ApiError::invalid(operator)),
    }
}

/// MongoDB also takes numbers here: non-zero means true.
fn parse_exists(operand: &Value) -> Result<bool, ApiError> {
    match operand {
        Value::Bool(wanted) => Ok(*wanted),
        Value::Number(n) => Ok(n.as_f64().is_some_and(|n| n != 0.0)),
        _ => Err(ApiError::invalid("$exists")),
    }
}

fn parse_regex(pattern: &Value, options: Option<&Value>) -> Result<Regex, ApiError> {
    let Value::String(pattern) = pattern else {
        return Err(ApiError::invalid("$regex"));
    };
    let options = match options {
        None => "",
        Some(Value::String(flags)) if flags.chars().all(|c| "imsx".contains(c)) => flags.as_str(),
        Some(_) => return Err(ApiError::invalid("$options")),
    };
    RegexBuilder::new(pattern)
        .case_insensitive(options.contains('i'))
        .multi_line(options.contains('m'))
        .dot_matches_new_line(options.contains('s'))
        .ignore_whitespace(options.contains('x'))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|_| ApiError::invalid("$regex"))
}

impl Node {
    fn matches(&self, record: &Value) -> bool {
        match self {
            Node::All(clauses) => clauses.iter().all(|c| c.matches(record)),
            Node::Any(clauses) => clauses.iter().any(|c| c.matches(record)),
            Node::Field { path, test } => test.matches(lookup(record, path.iter().map(String::as_str))),
        }
    }
}

impl Test {
    fn matches(&self, field: Option<&Value>) -> bool {
        match self {
            Test::Eq(wanted) => field_equals(field, wanted),
            Test::Ne(unwanted) => !field_equals(field, unwanted),
            Test::In(wanted) => wanted.iter().any(|w| field_equals(field, w)),
            Test::Nin(unwanted) => !unwanted.iter().any(|u| field_equals(field, u)),
            Test::Range(bound, limit) => {
                candidates(field).any(|value| compare(value, limit).is_some_and(|order| bound.accepts(order)))
            }
            Test::Regex(regex) => candidates(field).any(|value| value.as_str().is_some_and(|s| regex.is_match(s))),
            Test::Exists(wanted) => field.is_some() == *wanted,
        }
    }
}

impl Bound {
    fn accepts(self, order: Ordering) -> bool {
        match self {
            Bound::Gt => order == Ordering::Greater,
            Bound::Gte => order != Ordering::Less,
            Bound::Lt => order == Ordering::Less,
            Bound::Lte => order != Ordering::Greater,
        }
    }
}

/// The value at a path (the segments of a dotted name), through nested objects.
pub(super) fn lookup<'a, 'p>(record: &'a Value, path: impl IntoIterator<Item = &'p str>) -> Option<&'a Value> {
    path.into_iter().try_fold(record, |value, segment| value.as_object()?.get(segment))
}

/// MongoDB equality: the field equals the value, or is an array with an element equal to
/// it; `null` also matches a missing field.
fn field_equals(field: Option<&Value>, wanted: &Value) -> bool {
    match field {
        None => wanted.is_null(),
        Some(value) => {
            values_equal(value, wanted)
                || value.as_array().is_some_and(|items| items.iter().any(|v| values_equal(v, wanted)))
        }
    }
}

/// What ordering and regex operators look at: an array's elements, otherwise the value.
fn candidates(field: Option<&Value>) -> Box<dyn Iterator<Item = &Value> + '_> {
    match field {
        None => Box::new(std::iter::empty()),
        Some(Value::Array(items)) => Box::new(items.iter()),
        Some(value) => Box::new(std::iter::once(value)),
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y) == Some(Ordering::Equal),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| values_equal(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len() && xs.iter().all(|(k, x)| ys.get(k).is_some_and(|y| values_equal(x, y)))
        }
        _ => a == b,
    }
}

/// Numbers numerically, strings lexicographically; other pairs are not ordered.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Exact for integers, by `f64` when either side is fractional or they differ in sign range.
pub(super) fn compare_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::codes::ErrorCode;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "subscription_id": 7,
            "subscription_name": "Hosts",
            "subscription_form": "hostcreate,hostupdate",
            "bk_supplier_account": "0",
            "time_out": 10,
            "last_time": "",
            "tags": ["a", "b", 3],
            "statistics": {"total": 30, "failure": 2},
        })
    }

    #[test]
    fn matching() {
        let table = [
            (json!({}), true),
            (json!({"subscription_id": 7}), true),
            (json!({"subscription_id": 7.0}), true),
            (json!({"subscription_id": "7"}), false),
            (json!({"subscription_id": 8}), false),
            (json!({"subscription_id": 7, "subscription_name": "Hosts"}), true),
            (json!({"subscription_id": 7, "subscription_name": "hosts"}), false),
            (json!({"statistics.total": 30}), true),
            (json!({"statistics.total": {"$gte": 30, "$lt": 31}}), true),
            (json!({"statistics.total": {"$gt": 30}}), false),
            (json!({"statistics.missing.deeper": {"$exists": false}}), true),
            (json!({"statistics": {"failure": 2.0, "total": 30}}), true),
            (json!({"statistics": {"total": 30}}), false),
            (json!({"subscription_id": {"$eq": 7}}), true),
            (json!({"subscription_id": {"$ne": 7}}), false),
            (json!({"subscription_id": {"$gt": 6.5}}), true),
            (json!({"subscription_id": {"$lte": 7}}), true),
            (json!({"subscription_id": {"$lt": 7}}), false),
            (json!({"subscription_id": {"$gt": "6"}}), false),
            (json!({"subscription_id": {"$lt": "8"}}), false),
            (json!({"subscription_name": {"$gt": "Host"}}), true),
            (json!({"subscription_name": {"$lt": "Host"}}), false),
            (json!({"subscription_name": {"$gte": "Hosts"}}), true),
            (json!({"subscription_id": {"$in": [1, 7]}}), true),
            (json!({"subscription_id": {"$in": ["7"]}}), false),
            (json!({"subscription_id": {"$in": []}}), false),
            (json!({"subscription_id": {"$nin": [1, 2]}}), true),
            (json!({"subscription_id": {"$nin": [7]}}), false),
            (json!({"missing": {"$ne": 1}}), true),
            (json!({"missing": {"$nin": [1]}}), true),
            (json!({"missing": {"$gt": 0}}), false),
            (json!({"missing": {"$lt": 0}}), false),
            (json!({"missing": null}), true),
            (json!({"subscription_name": null}), false),
            (json!({"missing": {"$exists": true}}), false),
            (json!({"missing": {"$exists": false}}), true),
            (json!({"last_time": {"$exists": true}}), true),
            (json!({"last_time": {"$exists": 0}}), false),
            (json!({"subscription_form": {"$regex": "hostupdate"}}), true),
            (json!({"subscription_form": {"$regex": "^hostupdate"}}), false),
            (json!({"subscription_name": {"$regex": "^hosts$"}}), false),
            (json!({"subscription_name": {"$regex": "^hosts$", "$options": "i"}}), true),
            (json!({"subscription_name": {"$regex": "^ h o s t s $", "$options": "ix"}}), true),
            (json!({"subscription_id": {"$regex": "7"}}), false),
            (json!({"tags": "b"}), true),
            (json!({"tags": 3.0}), true),
            (json!({"tags": "c"}), false),
            (json!({"tags": ["a", "b", 3]}), true),
            (json!({"tags": {"$in": ["c", "a"]}}), true),
            (json!({"tags": {"$ne": "a"}}), false),
            (json!({"tags": {"$gt": 2}}), true),
            (json!({"tags": {"$regex": "^b$"}}), true),
            (json!({"$and": [{"subscription_id": 7}, {"time_out": 10}]}), true),
            (json!({"$and": [{"subscription_id": 7}, {"time_out": 11}]}), false),
            (json!({"$or": [{"subscription_id": 1}, {"time_out": 10}]}), true),
            (json!({"$or": [{"subscription_id": 1}, {"time_out": 11}]}), false),
            (json!({"$or": [{"$and": [{"subscription_id": 7}, {"tags": "a"}]}, {"subscription_id": 1}]}), true),
            (json!({"subscription_id": 7, "$or": [{"time_out": 11}]}), false),
        ];
        for (condition, expected) in table {
            let filter = Filter::parse(&condition).unwrap_or_else(|e| panic!("{condition}: {e}"));
            assert_eq!(filter.matches(&record()), expected, "{condition}");
        }
    }

    #[test]
    fn rejections_name_the_operator() {
        let table = [
            (json!({"$where": "true"}), "$where"),
            (json!({"$nor": [{"a": 1}]}), "$nor"),
            (json!({"a": {"$elemMatch": {"b": 1}}}), "$elemMatch"),
            (json!({"a": {"$not": {"$eq": 1}}}), "$not"),
            (json!({"a": {"$gt": 1, "b": 2}}), "b"),
            (json!({"$or": [{"a": {"$size": 1}}]}), "$size"),
            (json!({"$and": []}), "$and"),
            (json!({"$and": {"a": 1}}), "$and"),
            (json!({"$or": [1]}), "$or"),
            (json!({"a": {"$in": 1}}), "$in"),
            (json!({"a": {"$nin": "x"}}), "$nin"),
            (json!({"a": {"$exists": "yes"}}), "$exists"),
            (json!({"a": {"$regex": "("}}), "$regex"),
            (json!({"a": {"$regex": 1}}), "$regex"),
            (json!({"a": {"$regex": "x", "$options": "g"}}), "$options"),
            (json!({"a": {"$regex": "x", "$options": 1}}), "$options"),
            (json!({"a": {"$options": "i"}}), "$options"),
            (json!({"a": {"$regex": "a{100000}{100000}"}}), "$regex"),
            (json!({"a..b": 1}), "a..b"),
            (json!([]), "condition"),
            (json!("x"), "condition"),
        ];
        for (condition, named) in table {
            let error = Filter::parse(&condition).expect_err(&condition.to_string());
            assert_eq!(error.code, ErrorCode::FieldInvalid, "{condition}");
            assert_eq!(error.detail.as_deref(), Some(named), "{condition}");
        }
    }

    #[test]
    fn a_condition_past_its_limits_is_refused_naming_the_limit() {
        let regexes = |n: usize| {
            let terms: Vec<Value> = (0..n).map(|i| json!({format!("f{i}"): {"$regex": "\\w{20}"}})).collect();
            json!({"$or": terms})
        };
        assert!(Filter::parse(&regexes(MAX_REGEX_TERMS)).is_ok());
        let nested = |depth: usize| (0..depth).fold(json!({"a": 1}), |inner, _| json!({"$and": [inner]}));
        assert!(Filter::parse(&nested(MAX_DEPTH)).is_ok());
        let many_in = |n: usize| json!({"a": {"$in": (0..n).collect::<Vec<_>>()}});
        assert!(Filter::parse(&many_in(MAX_TERMS - 2)).is_ok());
        let table = [
            (regexes(MAX_REGEX_TERMS + 1), format!("condition (more than {MAX_REGEX_TERMS} $regex terms)")),
            (nested(MAX_DEPTH + 1), format!("condition (nested deeper than {MAX_DEPTH})")),
            (many_in(MAX_TERMS), format!("condition (more than {MAX_TERMS} terms)")),
        ];
        for (condition, named) in table {
            let error = Filter::parse(&condition).expect_err("over a limit");
            assert_eq!(error.code, ErrorCode::FieldInvalid);
            assert_eq!(error.detail.as_deref(), Some(named.as_str()));
        }
    }

    #[test]
    fn a_regex_over_its_compiled_size_cap_is_refused() {
        // \w is every Unicode word character: a few hundred of them outgrow 256 KiB.
        assert!(Filter::parse(&json!({"a": {"$regex": "\\w{8}"}})).is_ok());
        let error = Filter::parse(&json!({"a": {"$regex": "\\w{400}"}})).expect_err("too big");
        assert_eq!(error.detail.as_deref(), Some("$regex"));
    }

    #[test]
    fn force_owner_is_anded_with_the_condition() {
        let table = [
            (json!({}), json!({"bk_supplier_account": "0"}), true),
            (json!({}), json!({"bk_supplier_account": "1"}), false),
            (json!({}), json!({}), false),
            (json!({"bk_supplier_account": "1"}), json!({"bk_supplier_account": "1"}), false),
            (json!({"$or": [{"a": 1}, {"b": 1}]}), json!({"a": 1, "bk_supplier_account": "0"}), true),
            (json!({"$or": [{"a": 1}, {"b": 1}]}), json!({"a": 1, "bk_supplier_account": "2"}), false),
        ];
        for (condition, record, expected) in table {
            let mut filter = Filter::parse(&condition).unwrap();
            filter.force_owner("0");
            assert_eq!(filter.matches(&record), expected, "{condition} over {record}");
        }
    }

    #[test]
    fn large_integers_compare_exactly() {
        let record = json!({"n": u64::MAX, "m": i64::MIN});
        let table = [
            (json!({"n": u64::MAX}), true),
            (json!({"n": {"$gt": u64::MAX - 1}}), true),
            (json!({"n": {"$gt": -1}}), true),
            (json!({"m": {"$lt": 0}}), true),
            (json!({"m": i64::MIN + 1}), false),
        ];
        for (condition, expected) in table {
            assert_eq!(Filter::parse(&condition).unwrap().matches(&record), expected, "{condition}");
        }
    }
}
