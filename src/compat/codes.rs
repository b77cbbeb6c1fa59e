//! bk-cmdb error codes, their HTTP statuses on the direct paths, and messages.
//!
//! The codes are bk-cmdb's (clients branch on them); the wording is herald's own, Chinese by
//! default and English when the client asks for it, as bk-cmdb does.

/// Message language, from the `HTTP_BLUEKING_LANGUAGE` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Lang {
    #[default]
    Zh,
    En,
}

impl Lang {
    /// `en` (any case, surrounding spaces ignored) selects English; anything else, or no
    /// header, Chinese.
    pub fn from_header(value: Option<&str>) -> Self {
        match value {
            Some(v) if v.trim().eq_ignore_ascii_case("en") => Lang::En,
            _ => Lang::Zh,
        }
    }
}

/// The bk-cmdb error codes herald answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    CreateFailed,
    DeleteFailed,
    QueryFailed,
    UpdateFailed,
    PingFailed,
    TelnetFailed,
    JsonDecode,
    FieldInvalid,
    FieldMissing,
    FieldDuplicated,
    IdentityMissing,
    NoPermission,
    Internal,
}

impl ErrorCode {
    pub const fn code(self) -> i64 {
        match self {
            ErrorCode::CreateFailed => 1_103_000,
            ErrorCode::DeleteFailed => 1_103_001,
            ErrorCode::QueryFailed => 1_103_002,
            ErrorCode::UpdateFailed => 1_103_003,
            ErrorCode::PingFailed => 1_103_004,
            ErrorCode::TelnetFailed => 1_103_005,
            ErrorCode::JsonDecode => 1_199_000,
            ErrorCode::FieldInvalid => 1_199_006,
            ErrorCode::FieldMissing => 1_199_010,
            ErrorCode::FieldDuplicated => 1_199_014,
            ErrorCode::IdentityMissing => 1_199_027,
            ErrorCode::NoPermission => 9_900_403,
            ErrorCode::Internal => 1_199_999,
        }
    }

    /// HTTP status on the direct paths (ESB answers 200 always). A duplicated name answers
    /// 200 with `result: false`, as bk-cmdb does.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::CreateFailed | ErrorCode::QueryFailed | ErrorCode::Internal => 500,
            ErrorCode::FieldDuplicated => 200,
            ErrorCode::IdentityMissing => 401,
            ErrorCode::NoPermission => 403,
            ErrorCode::DeleteFailed
            | ErrorCode::UpdateFailed
            | ErrorCode::PingFailed
            | ErrorCode::TelnetFailed
            | ErrorCode::JsonDecode
            | ErrorCode::FieldInvalid
            | ErrorCode::FieldMissing => 400,
        }
    }

    /// The message for `bk_error_msg` / `message`. For the field codes `detail` is the field
    /// (or filter operator) name; for the others it is appended as the cause.
    pub fn message(self, lang: Lang, detail: Option<&str>) -> String {
        if let Some(message) = self.field_message(lang, detail) {
            return message;
        }
        let base = self.base_message(lang);
        match (detail, lang) {
            (Some(cause), Lang::Zh) => format!("{base}：{cause}"),
            (Some(cause), Lang::En) => format!("{base}: {cause}"),
            (None, _) => base.to_string(),
        }
    }

    fn field_message(self, lang: Lang, field: Option<&str>) -> Option<String> {
        let field = field?;
        let message = match (self, lang) {
            (ErrorCode::FieldInvalid, Lang::Zh) => format!("{field} 的值不合法"),
            (ErrorCode::FieldInvalid, Lang::En) => format!("{field} is invalid"),
            (ErrorCode::FieldMissing, Lang::Zh) => format!("{field} 不能为空"),
            (ErrorCode::FieldMissing, Lang::En) => format!("{field} is required"),
            (ErrorCode::FieldDuplicated, Lang::Zh) => format!("{field} 已存在"),
            (ErrorCode::FieldDuplicated, Lang::En) => format!("{field} is already in use"),
            _ => return None,
        };
        Some(message)
    }

    fn base_message(self, lang: Lang) -> &'static str {
        match (self, lang) {
            (ErrorCode::CreateFailed, Lang::Zh) => "创建订阅失败",
            (ErrorCode::CreateFailed, Lang::En) => "failed to create the subscription",
            (ErrorCode::DeleteFailed, Lang::Zh) => "删除订阅失败",
            (ErrorCode::DeleteFailed, Lang::En) => "failed to delete the subscription",
            (ErrorCode::QueryFailed, Lang::Zh) => "查询订阅失败",
            (ErrorCode::QueryFailed, Lang::En) => "failed to search subscriptions",
            (ErrorCode::UpdateFailed, Lang::Zh) => "更新订阅失败",
            (ErrorCode::UpdateFailed, Lang::En) => "failed to update the subscription",
            (ErrorCode::PingFailed, Lang::Zh) => "推送测试失败",
            (ErrorCode::PingFailed, Lang::En) => "the test push to the callback failed",
            (ErrorCode::TelnetFailed, Lang::Zh) => "连通性测试失败",
            (ErrorCode::TelnetFailed, Lang::En) => "could not connect to the callback",
            (ErrorCode::JsonDecode, Lang::Zh) => "请求体不是合法的 JSON，或字段类型不正确",
            (ErrorCode::JsonDecode, Lang::En) => "the request body is not valid JSON or a field has the wrong type",
            (ErrorCode::FieldInvalid, Lang::Zh) => "字段的值不合法",
            (ErrorCode::FieldInvalid, Lang::En) => "a field is invalid",
            (ErrorCode::FieldMissing, Lang::Zh) => "缺少必填字段",
            (ErrorCode::FieldMissing, Lang::En) => "a required field is missing",
            (ErrorCode::FieldDuplicated, Lang::Zh) => "字段的值已存在",
            (ErrorCode::FieldDuplicated, Lang::En) => "a field value is already in use",
            (ErrorCode::IdentityMissing, Lang::Zh) => "缺少身份信息，或身份信息无效",
            (ErrorCode::IdentityMissing, Lang::En) => "identity information is missing or unusable",
            (ErrorCode::NoPermission, Lang::Zh) => "没有操作权限",
            (ErrorCode::NoPermission, Lang::En) => "permission denied",
            (ErrorCode::Internal, Lang::Zh) => "系统内部错误",
            (ErrorCode::Internal, Lang::En) => "internal error",
        }
    }
}

/// A failed API call: the bk-cmdb code and, for the field codes, the field's name.
/// `Display` is the English message, for logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} ({})", self.code.message(Lang::En, self.detail.as_deref()), self.code.code())]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> Self {
        ApiError { code, detail: None }
    }

    /// 1199010: a required field is missing or blank.
    pub fn missing(field: &str) -> Self {
        ApiError::new(ErrorCode::FieldMissing).with_detail(field)
    }

    /// 1199006: a field (or filter operator) fails validation.
    pub fn invalid(field: &str) -> Self {
        ApiError::new(ErrorCode::FieldInvalid).with_detail(field)
    }

    /// 1199006 naming the field and why it fails: `with_detail` would replace the field's
    /// name, which the field codes' messages are built from.
    pub fn invalid_because(field: &str, reason: impl std::fmt::Display) -> Self {
        ApiError::invalid(&format!("{field} ({reason})"))
    }

    /// 1199014: a field's value is already used, such as a subscription name.
    pub fn duplicated(field: &str) -> Self {
        ApiError::new(ErrorCode::FieldDuplicated).with_detail(field)
    }

    /// Names the field, or for the other codes adds the cause to the message. The cause is
    /// shown to the client: keep secrets and internals out of it.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn message(&self, lang: Lang) -> String {
        self.code.message(lang, self.detail.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_keeps_the_field_name() {
        let error = ApiError::invalid_because("callback_url", "destination refused");
        assert_eq!(error.message(Lang::En), "callback_url (destination refused) is invalid");
    }

    #[test]
    fn codes_and_statuses_are_bk_cmdbs() {
        let table = [
            (ErrorCode::CreateFailed, 1103000, 500),
            (ErrorCode::DeleteFailed, 1103001, 400),
            (ErrorCode::QueryFailed, 1103002, 500),
            (ErrorCode::UpdateFailed, 1103003, 400),
            (ErrorCode::PingFailed, 1103004, 400),
            (ErrorCode::TelnetFailed, 1103005, 400),
            (ErrorCode::JsonDecode, 1199000, 400),
            (ErrorCode::FieldInvalid, 1199006, 400),
            (ErrorCode::FieldMissing, 1199010, 400),
            (ErrorCode::FieldDuplicated, 1199014, 200),
            (ErrorCode::IdentityMissing, 1199027, 401),
            (ErrorCode::NoPermission, 9900403, 403),
            (ErrorCode::Internal, 1199999, 500),
        ];
        for (code, number, status) in table {
            assert_eq!(code.code(), number, "{code:?}");
            assert_eq!(code.http_status(), status, "{code:?}");
        }
    }

    #[test]
    fn language_header() {
        let table = [
            (None, Lang::Zh),
            (Some("en"), Lang::En),
            (Some(" EN "), Lang::En),
            (Some("En"), Lang::En),
            (Some("zh-cn"), Lang::Zh),
            (Some("english"), Lang::Zh),
            (Some(""), Lang::Zh),
        ];
        for (header, lang) in table {
            assert_eq!(Lang::from_header(header), lang, "{header:?}");
        }
    }

    #[test]
    fn field_messages_name_the_field() {
        let table = [
            (ApiError::missing("subscription_name"), Lang::En, "subscription_name is required"),
            (ApiError::missing("subscription_name"), Lang::Zh, "subscription_name 不能为空"),
            (ApiError::invalid("$where"), Lang::En, "$where is invalid"),
            (ApiError::invalid("confirm_mode"), Lang::Zh, "confirm_mode 的值不合法"),
            (ApiError::duplicated("subscription_name"), Lang::En, "subscription_name is already in use"),
            (ApiError::duplicated("subscription_name"), Lang::Zh, "subscription_name 已存在"),
        ];
        for (error, lang, message) in table {
            assert_eq!(error.message(lang), message);
        }
    }

    #[test]
    fn other_messages_append_the_cause() {
        let table = [
            (ApiError::new(ErrorCode::Internal), Lang::En, "internal error"),
            (ApiError::new(ErrorCode::Internal), Lang::Zh, "系统内部错误"),
            (
                ApiError::new(ErrorCode::PingFailed).with_detail("connection refused"),
                Lang::En,
                "the test push to the callback failed: connection refused",
            ),
            (
                ApiError::new(ErrorCode::TelnetFailed).with_detail("connection refused"),
                Lang::Zh,
                "连通性测试失败：connection refused",
            ),
            (ApiError::new(ErrorCode::FieldMissing), Lang::En, "a required field is missing"),
        ];
        for (error, lang, message) in table {
            assert_eq!(error.message(lang), message);
        }
    }

    #[test]
    fn every_code_has_a_message_in_both_languages() {
        let codes = [
            ErrorCode::CreateFailed,
            ErrorCode::DeleteFailed,
            ErrorCode::QueryFailed,
            ErrorCode::UpdateFailed,
            ErrorCode::PingFailed,
            ErrorCode::TelnetFailed,
            ErrorCode::JsonDecode,
            ErrorCode::FieldInvalid,
            ErrorCode::FieldMissing,
            ErrorCode::FieldDuplicated,
            ErrorCode::IdentityMissing,
            ErrorCode::NoPermission,
            ErrorCode::Internal,
        ];
        for code in codes {
            let zh = code.message(Lang::Zh, None);
            let en = code.message(Lang::En, None);
            assert!(!zh.is_empty() && !en.is_empty() && zh != en, "{code:?}");
        }
    }

    #[test]
    fn display_is_english_with_the_code() {
        assert_eq!(ApiError::invalid("callback_url").to_string(), "callback_url is invalid (1199006)");
    }
}
