//! Response envelopes: bk-cmdb's own on the direct paths, the BlueKing ESB gateway's on the
//! `/api/c/compapi/v2/cc/` paths. Both carry `data: null` on errors and `permission: null`
//! unless a permission failure fills it.

use super::codes::{ApiError, Lang};
use serde_json::{Value, json};

/// The message of every successful answer, in both flavours.
pub const SUCCESS_MESSAGE: &str = "success";

/// Direct-path success: `{"result": true, "bk_error_code": 0, "bk_error_msg": "success", …}`.
pub fn direct_ok(data: Value) -> Value {
    json!({
        "result": true,
        "bk_error_code": 0,
        "bk_error_msg": SUCCESS_MESSAGE,
        "data": data,
        "permission": Value::Null,
    })
}

/// Direct-path failure. The HTTP status comes from `err.code.http_status()`.
pub fn direct_err(err: &ApiError, lang: Lang, permission: Option<Value>) -> Value {
    json!({
        "result": false,
        "bk_error_code": err.code.code(),
        "bk_error_msg": err.message(lang),
        "data": Value::Null,
        "permission": permission.unwrap_or(Value::Null),
    })
}

/// ESB success: `{"result": true, "code": 0, "message": "success", …, "request_id"}`.
pub fn esb_ok(data: Value, request_id: &str) -> Value {
    json!({
        "result": true,
        "code": 0,
        "message": SUCCESS_MESSAGE,
        "data": data,
        "permission": Value::Null,
        "request_id": request_id,
    })
}

/// ESB failure; ESB answers HTTP 200 whatever the code.
pub fn esb_err(err: &ApiError, lang: Lang, permission: Option<Value>, request_id: &str) -> Value {
    json!({
        "result": false,
        "code": err.code.code(),
        "message": err.message(lang),
        "data": Value::Null,
        "permission": permission.unwrap_or(Value::Null),
        "request_id": request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::codes::ErrorCode;

    #[test]
    fn envelopes() {
        let permission = json!({"system_id": "bk_cmdb", "actions": []});
        let table = [
            (
                direct_ok(json!({"subscription_id": 7})),
                json!({"result": true, "bk_error_code": 0, "bk_error_msg": "success",
                       "data": {"subscription_id": 7}, "permission": null}),
            ),
            (
                direct_err(&ApiError::missing("callback_url"), Lang::En, None),
                json!({"result": false, "bk_error_code": 1199010, "bk_error_msg": "callback_url is required",
                       "data": null, "permission": null}),
            ),
            (
                direct_err(&ApiError::new(ErrorCode::NoPermission), Lang::En, Some(permission.clone())),
                json!({"result": false, "bk_error_code": 9900403, "bk_error_msg": "permission denied",
                       "data": null, "permission": permission.clone()}),
            ),
            (
                esb_ok(json!("success"), "req-1"),
                json!({"result": true, "code": 0, "message": "success", "data": "success",
                       "permission": null, "request_id": "req-1"}),
            ),
            (
                esb_err(&ApiError::invalid("confirm_mode"), Lang::Zh, None, "req-2"),
                json!({"result": false, "code": 1199006, "message": "confirm_mode 的值不合法",
                       "data": null, "permission": null, "request_id": "req-2"}),
            ),
            (
                esb_err(&ApiError::new(ErrorCode::NoPermission), Lang::En, Some(permission.clone()), "req-3"),
                json!({"result": false, "code": 9900403, "message": "permission denied",
                       "data": null, "permission": permission, "request_id": "req-3"}),
            ),
        ];
        for (built, expected) in table {
            assert_eq!(built, expected);
        }
    }
}
