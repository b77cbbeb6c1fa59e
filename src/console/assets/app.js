// herald's console: one page, no dependencies. It signs in for a session cookie and then
// calls herald's REST API, sending the session's CSRF token with every change; what it may
// see and do is what the REST API allows its user. Views: sign-in, list, form, detail.
"use strict";

const TEXT = {
  zh: {
    title: "事件推送", language: "语言", signIn: "登录", signOut: "退出登录",
    signInHint: "使用 Kubernetes 令牌登录（受众 herald）。开发模式允许匿名登录时可留空。",
    token: "Kubernetes 令牌", esbApp: "或使用蓝鲸 ESB 应用身份", appCode: "应用 ID（bk_app_code）", appSecret: "应用密钥（bk_app_secret）", account: "开发商账号", show: "查看", search: "搜索",
    searchHint: "按名称、系统、事件或回调地址过滤", sortBy: "排序", newSubscription: "新建订阅",
    id: "ID", name: "名称", system: "系统", events: "事件", callback: "回调地址", ready: "就绪",
    healthy: "回调健康", total: "推送总数", failure: "失败", successRate: "成功率", pending: "待推送",
    deadLetters: "死信", lastDelivery: "最后推送", lastError: "最后错误", namespace: "命名空间",
    operator: "最后修改人", empty: "该账号下还没有订阅。", noMatch: "没有符合条件的订阅。",
    previous: "上一页", next: "下一页", page: "第 {0} / {1} 页，共 {2} 条",
    subscriptionName: "订阅名称", systemName: "系统名称", callbackUrl: "回调地址",
    subscriptionForm: "订阅事件", subscriptionFormHint: "逗号分隔，例如 hostcreate,hostupdate",
    confirmMode: "推送确认方式", httpstatus: "HTTP 状态码", regular: "正则匹配",
    confirmPattern: "确认规则", confirmPatternHint: "状态码（如 200）或匹配回复内容的正则表达式",
    timeout: "超时（秒）", testPush: "测试推送", telnet: "连通性测试", save: "保存", cancel: "取消",
    edit: "编辑", remove: "删除", confirmDelete: "确定删除订阅 {0}？", saved: "已保存",
    deleted: "已删除", status: "状态", answer: "回复", reachable: "连接成功",
    detail: "订阅详情", conditions: "状态条件", type: "类型", reason: "原因", message: "信息",
    chart: "最近 24 小时推送次数与失败次数", attempts: "推送次数", failures: "失败次数",
    deliveryLog: "推送记录", time: "时间", distributionId: "分发 ID", attempt: "第几次",
    result: "结果", httpStatus: "HTTP 状态", latency: "耗时", error: "错误",
    delivered: "成功", failed: "失败", dead_lettered: "进入死信", noAttempts: "还没有推送记录。",
    noDeadLetters: "没有死信。", replay: "重新推送", replayAll: "全部重新推送", replayed: "已重新排队 {0} 条",
    event: "事件", deadAt: "进入死信时间", back: "返回列表", yes: "是", no: "否", unknown: "未知",
    signedInAs: "当前用户：{0}", expired: "会话已过期，请重新登录。", loading: "加载中…",
  },
  en: {
    title: "Event push", language: "Language", signIn: "Sign in", signOut: "Sign out",
    signInHint: "Sign in with a Kubernetes token (audience herald). Leave it empty when the development anonymous switch is on.",
    token: "Kubernetes token", esbApp: "Or a BlueKing ESB app", appCode: "App code (bk_app_code)", appSecret: "App secret (bk_app_secret)", account: "Supplier account", show: "Show", search: "Search",
    searchHint: "Filter by name, system, event or callback URL", sortBy: "Sort by", newSubscription: "New subscription",
    id: "ID", name: "Name", system: "System", events: "Events", callback: "Callback", ready: "Ready",
    healthy: "Callback healthy", total: "Total", failure: "Failures", successRate: "Success rate", pending: "Pending",
    deadLetters: "Dead letters", lastDelivery: "Last delivery", lastError: "Last error", namespace: "Namespace",
    operator: "Last changed by", empty: "This account has no subscriptions yet.", noMatch: "No subscription matches.",
    previous: "Previous", next: "Next", page: "Page {0} of {1}, {2} in all",
    subscriptionName: "Subscription name", systemName: "System name", callbackUrl: "Callback URL",
    subscriptionForm: "Events", subscriptionFormHint: "Comma-separated, for example hostcreate,hostupdate",
    confirmMode: "Confirmed by", httpstatus: "HTTP status", regular: "Regular expression",
    confirmPattern: "Confirmation", confirmPatternHint: "A status code (such as 200) or a regular expression over the answer",
    timeout: "Timeout (seconds)", testPush: "Test push", telnet: "Connectivity test", save: "Save", cancel: "Cancel",
    edit: "Edit", remove: "Delete", confirmDelete: "Delete subscription {0}?", saved: "Saved",
    deleted: "Deleted", status: "Status", answer: "Answer", reachable: "Connected",
    detail: "Subscription", conditions: "Conditions", type: "Type", reason: "Reason", message: "Message",
    chart: "Attempts and failures over the last 24 hours", attempts: "Attempts", failures: "Failures",
    deliveryLog: "Delivery log", time: "Time", distributionId: "Distribution id", attempt: "Attempt",
    result: "Result", httpStatus: "HTTP status", latency: "Latency", error: "Error",
    delivered: "Delivered", failed: "Failed", dead_lettered: "Dead-lettered", noAttempts: "No attempts yet.",
    noDeadLetters: "No dead letters.", replay: "Replay", replayAll: "Replay all", replayed: "{0} requeued",
    event: "Event", deadAt: "Dead since", back: "Back to the list", yes: "yes", no: "no", unknown: "unknown",
    signedInAs: "Signed in as {0}", expired: "The session has ended; sign in again.", loading: "Loading…",
  },
};

const FIELDS = ["subscription_name", "system_name", "callback_url", "subscription_form", "confirm_mode", "confirm_pattern", "time_out"];
const PAGE_SIZE = 20;
const state = { lang: localStorage.getItem("herald.lang") || "zh", csrf: null, user: null, account: "0", query: "", sort: "subscription_id", page: 0 };

function t(key, ...args) {
  const text = (TEXT[state.lang] && TEXT[state.lang][key]) || TEXT.en[key] || key;
  return text.replace(/\{(\d)\}/g, (_, i) => String(args[Number(i)]));
}

// Elements: el("tag", {attr: value, onclick: fn}, child, ...); strings become text nodes.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function notice(text) {
  const box = document.getElementById("notice");
  box.textContent = text;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { box.textContent = ""; }, 4000);
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.bk_error_msg) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.bk_error_code;
  }
}

async function api(method, path, body) {
  const headers = { "HTTP_BLUEKING_LANGUAGE": state.lang === "en" ? "en" : "zh-cn" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.csrf && method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, { method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json().catch(() => null);
  if (!response.ok || !answer || answer.result !== true) {
    if (response.status === 401 && state.user) { state.user = null; state.csrf = null; notice(t("expired")); route(); }
    throw new ApiError(response.status, answer);
  }
  return answer.data;
}

function applyStaticText() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.title = `herald · ${t("title")}`;
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  document.getElementById("lang").value = state.lang;
  document.getElementById("user").textContent = state.user ? t("signedInAs", state.user) : "";
  document.getElementById("sign-out").hidden = !state.user;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
  applyStaticText();
}

function alertBox(error) {
  return el("div", { className: "alert", role: "alert" }, error.message);
}

// Views ----------------------------------------------------------------------------------

function signInView() {
  const error = el("div");
  const token = el("textarea", { id: "token", name: "token", autocomplete: "off", "aria-describedby": "token-hint" });
  const appCode = el("input", { id: "app-code", name: "app_code", autocomplete: "username" });
  const appSecret = el("input", { id: "app-secret", name: "app_secret", type: "password", autocomplete: "current-password" });
  const form = el("form", { className: "card", onsubmit: async (e) => {
    e.preventDefault();
    const credentials = appCode.value.trim()
      ? { app_code: appCode.value.trim(), app_secret: appSecret.value }
      : { token: token.value.trim() };
    try {
      const data = await api("POST", "/console/session", credentials);
      Object.assign(state, { csrf: data.csrf, user: data.user });
      location.hash = "#/";
      route();
    } catch (err) {
      error.replaceChildren(alertBox(err));
    }
  } },
    el("h2", {}, t("signIn")), error,
    el("label", { for: "token" }, t("token")), token,
    el("p", { id: "token-hint", className: "hint muted" }, t("signInHint")),
    el("fieldset", { className: "row" }, el("legend", {}, t("esbApp")),
      el("div", { className: "field" }, el("label", { for: "app-code" }, t("appCode")), appCode),
      el("div", { className: "field" }, el("label", { for: "app-secret" }, t("appSecret")), appSecret)),
    el("button", { type: "submit", id: "sign-in" }, t("signIn")));
  show(form);
  token.focus();
}

function rate(row) {
  const total = row.statistics.total;
  return total ? ((total - row.statistics.failure) / total) * 100 : null;
}

function condition(row, type) {
  return (row.conditions || []).find((c) => c.type === type);
}

function conditionCell(row, type) {
  const c = condition(row, type);
  if (!c) return el("span", { className: "muted" }, t("unknown"));
  return el("span", { className: c.status === "True" ? "ok" : "bad", title: c.message }, c.status === "True" ? t("yes") : `${t("no")} (${c.reason})`);
}

async function listView() {
  const accountInput = el("input", { id: "account", value: state.account, size: 8 });
  const searchInput = el("input", { id: "search", type: "search", value: state.query, placeholder: t("searchHint"), "aria-describedby": "search-hint" });
  const sortSelect = el("select", { id: "sort" },
    ...[["subscription_id", "id"], ["subscription_name", "name"], ["failure", "failure"], ["pending", "pending"], ["last_delivery", "lastDelivery"]]
      .map(([value, key]) => el("option", { value, selected: state.sort === value }, t(key))));
  const body = el("div", {}, el("p", { className: "muted" }, t("loading")));
  const controls = el("form", { className: "row", onsubmit: (e) => { e.preventDefault(); state.account = accountInput.value.trim() || "0"; state.query = searchInput.value; state.sort = sortSelect.value; state.page = 0; listView(); } },
    el("div", {}, el("label", { for: "account" }, t("account")), accountInput),
    el("div", { className: "field" }, el("label", { for: "search" }, t("search")), searchInput, el("span", { id: "search-hint", className: "hidden-label" }, t("searchHint"))),
    el("div", {}, el("label", { for: "sort" }, t("sortBy")), sortSelect),
    el("button", { type: "submit", id: "show" }, t("show")),
    el("button", { type: "button", className: "secondary", id: "new", onclick: () => { location.hash = "#/new"; } }, t("newSubscription")));
  show(el("h2", {}, t("title")), controls, body);
  let rows;
  try {
    rows = (await api("GET", `/console/subscriptions/${encodeURIComponent(state.account)}`)).info;
  } catch (err) {
    body.replaceChildren(alertBox(err));
    return;
  }
  if (!rows.length) { body.replaceChildren(el("p", { className: "empty card" }, t("empty"))); return; }
  const query = state.query.trim().toLowerCase();
  const matching = rows.filter((r) => !query || [r.subscription_name, r.system_name, r.subscription_form, r.callback_url].some((v) => String(v || "").toLowerCase().includes(query)));
  const key = { subscription_id: (r) => r.subscription_id, subscription_name: (r) => r.subscription_name, failure: (r) => -r.statistics.failure, pending: (r) => -r.pending, last_delivery: (r) => r.last_delivery || "" }[state.sort];
  matching.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : a.subscription_id - b.subscription_id));
  if (!matching.length) { body.replaceChildren(el("p", { className: "empty card" }, t("noMatch"))); return; }
  const pages = Math.ceil(matching.length / PAGE_SIZE);
  state.page = Math.min(state.page, pages - 1);
  const shown = matching.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
  const head = ["id", "name", "system", "events", "callback", "ready", "healthy", "total", "failure", "successRate", "pending", "deadLetters", "lastDelivery", "lastError", "namespace", "operator"];
  const table = el("table", { id: "subscriptions" },
    el("thead", {}, el("tr", {}, head.map((k) => el("th", { scope: "col" }, t(k))))),
    el("tbody", {}, shown.map((r) => {
      const success = rate(r);
      return el("tr", { "data-id": r.subscription_id },
        el("td", { className: "num" }, el("a", { href: `#/subscription/${r.subscription_id}` }, r.subscription_id)),
        el("td", {}, el("a", { href: `#/subscription/${r.subscription_id}` }, r.subscription_name)),
        el("td", {}, r.system_name), el("td", { className: "wrap" }, r.subscription_form), el("td", { className: "wrap" }, r.callback_url),
        el("td", {}, conditionCell(r, "Ready")), el("td", {}, conditionCell(r, "CallbackHealthy")),
        el("td", { className: "num" }, r.statistics.total), el("td", { className: "num failure" }, r.statistics.failure),
        el("td", { className: "num" }, success === null ? "–" : `${success.toFixed(1)}%`),
        el("td", { className: "num" }, r.pending), el("td", { className: "num" }, r.dead_lettered),
        el("td", {}, r.last_delivery || "–"), el("td", { className: "wrap" }, r.last_error || "–"),
        el("td", {}, r.namespace), el("td", {}, r.operator || "–"));
    })));
  const pager = el("div", { className: "pager" },
    el("button", { type: "button", className: "secondary", disabled: state.page === 0, onclick: () => { state.page -= 1; listView(); } }, t("previous")),
    el("span", {}, t("page", state.page + 1, pages, matching.length)),
    el("button", { type: "button", className: "secondary", disabled: state.page >= pages - 1, onclick: () => { state.page += 1; listView(); } }, t("next")));
  body.replaceChildren(el("div", { className: "table-wrap" }, table), pager);
}

function formField(name, labelKey, input, hintKey) {
  input.id = `f-${name}`;
  input.name = name;
  const error = el("div", { className: "error", id: `f-${name}-error` });
  input.setAttribute("aria-describedby", `f-${name}-error${hintKey ? ` f-${name}-hint` : ""}`);
  return el("div", { className: "field", "data-field": name }, el("label", { for: input.id }, t(labelKey)), input,
    hintKey ? el("div", { className: "hint", id: `f-${name}-hint` }, t(hintKey)) : null, error);
}

function clearFieldErrors(form) {
  for (const node of form.querySelectorAll(".error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// The REST API's 1199xxx field errors name the field; show them next to it.
function showFieldError(form, err) {
  clearFieldErrors(form);
  const field = FIELDS.find((f) => err.message.includes(f));
  if (!field) return false;
  form.querySelector(`#f-${field}-error`).textContent = err.message;
  const input = form.querySelector(`#f-${field}`);
  input.setAttribute("aria-invalid", "true");
  input.focus();
  return true;
}

async function formView(id) {
  let existing = null;
  if (id) {
    try {
      existing = await api("GET", `/console/subscriptions/${encodeURIComponent(state.account)}/${id}`);
    } catch (err) { show(el("a", { href: "#/" }, t("back")), alertBox(err)); return; }
  }
  const value = (k, d) => (existing && existing[k] !== undefined && existing[k] !== null ? String(existing[k]) : d);
  const inputs = {
    subscription_name: el("input", { value: value("subscription_name", "") }),
    system_name: el("input", { value: value("system_name", "") }),
    callback_url: el("input", { type: "url", value: value("callback_url", ""), placeholder: "https://" }),
    subscription_form: el("input", { value: value("subscription_form", "") }),
    confirm_mode: el("select", {}, ["httpstatus", "regular"].map((m) => el("option", { value: m, selected: value("confirm_mode", "httpstatus") === m }, t(m)))),
    confirm_pattern: el("input", { value: value("confirm_pattern", "200") }),
    time_out: el("input", { type: "number", min: 1, value: value("time_out", "10") }),
  };
  const general = el("div");
  const probe = el("div", { id: "probe-result", "aria-live": "polite" });
  const body = () => ({
    subscription_name: inputs.subscription_name.value, system_name: inputs.system_name.value, callback_url: inputs.callback_url.value,
    subscription_form: inputs.subscription_form.value, confirm_mode: inputs.confirm_mode.value, confirm_pattern: inputs.confirm_pattern.value,
    time_out: Number(inputs.time_out.value),
  });
  const form = el("form", { className: "card", id: "subscription-form", novalidate: true, onsubmit: async (e) => {
    e.preventDefault();
    general.replaceChildren();
    clearFieldErrors(form);
    try {
      if (id) await api("PUT", `/api/v3/event/subscribe/${encodeURIComponent(state.account)}/${existing.bk_biz_id}/${id}`, body());
      const created = id ? null : await api("POST", `/api/v3/event/subscribe/${encodeURIComponent(state.account)}/0`, body());
      notice(t("saved"));
      location.hash = `#/subscription/${id || created.subscription_id}`;
    } catch (err) {
      if (!showFieldError(form, err)) general.replaceChildren(alertBox(err));
    }
  } },
    el("h2", {}, id ? `${t("edit")} #${id}` : t("newSubscription")), general,
    el("div", { className: "row" }, formField("subscription_name", "subscriptionName", inputs.subscription_name), formField("system_name", "systemName", inputs.system_name)),
    el("div", { className: "row" }, formField("callback_url", "callbackUrl", inputs.callback_url), formField("subscription_form", "subscriptionForm", inputs.subscription_form, "subscriptionFormHint")),
    el("div", { className: "row" }, formField("confirm_mode", "confirmMode", inputs.confirm_mode), formField("confirm_pattern", "confirmPattern", inputs.confirm_pattern, "confirmPatternHint"), formField("time_out", "timeout", inputs.time_out)),
    el("div", { className: "row" },
      el("button", { type: "button", className: "secondary", id: "test-push", onclick: async () => {
        probe.replaceChildren();
        clearFieldErrors(form);
        try {
          const answer = await api("POST", "/api/v3/event/subscribe/ping", { callback_url: inputs.callback_url.value, data: { herald: "test push" } });
          probe.replaceChildren(el("div", { className: "result" }, `${t("status")}: ${answer.http_status}\n${t("answer")}: ${answer.response_body}`));
        } catch (err) { if (!showFieldError(form, err)) probe.replaceChildren(alertBox(err)); }
      } }, t("testPush")),
      el("button", { type: "button", className: "secondary", id: "telnet", onclick: async () => {
        probe.replaceChildren();
        clearFieldErrors(form);
        try {
          await api("POST", "/api/v3/event/subscribe/telnet", { callback_url: inputs.callback_url.value });
          probe.replaceChildren(el("div", { className: "result" }, t("reachable")));
        } catch (err) { if (!showFieldError(form, err)) probe.replaceChildren(alertBox(err)); }
      } }, t("telnet")),
      el("button", { type: "submit", id: "save" }, t("save")),
      el("button", { type: "button", className: "secondary", onclick: () => history.back() }, t("cancel"))),
    probe);
  show(form);
  inputs.subscription_name.focus();
}

// 24 hours of per-minute bars: attempts behind, failures in front.
function chart(minutes) {
  const svg = "http://www.w3.org/2000/svg";
  const node = document.createElementNS(svg, "svg");
  node.setAttribute("class", "chart");
  node.setAttribute("viewBox", "0 0 1440 100");
  node.setAttribute("preserveAspectRatio", "none");
  node.setAttribute("role", "img");
  const sum = (field) => minutes.reduce((n, m) => n + m[field], 0);
  node.setAttribute("aria-label", `${t("chart")}: ${t("attempts")} ${sum("attempts")}, ${t("failures")} ${sum("failures")}`);
  const now = Math.floor(Date.now() / 60000);
  const top = Math.max(1, ...minutes.map((m) => m.attempts));
  for (const m of minutes) {
    const x = 1439 - Math.min(1439, Math.max(0, now - m.epoch_minute));
    for (const [field, cls] of [["attempts", "attempts"], ["failures", "failures"]]) {
      if (!m[field]) continue;
      const bar = document.createElementNS(svg, "rect");
      const h = Math.max(2, (m[field] / top) * 100);
      bar.setAttribute("class", cls);
      bar.setAttribute("x", String(x));
      bar.setAttribute("width", "4");
      bar.setAttribute("y", String(100 - h));
      bar.setAttribute("height", String(h));
      node.append(bar);
    }
  }
  return node;
}

// A replayed delivery is attempted a moment after the replay answers; the page reads the
// subscription again every second until each replayed distribution id has a final attempt
// above the log the replay started from, or the minute is up.
const REPLAY_FOLLOW_MS = 60000;

// Whether every replayed id has a delivered or dead-lettered attempt newer than `follow.after`
// (the log's newest entry when the replay was asked for; entries come newest first).
function replaySettled(entries, follow) {
  const newer = [];
  for (const entry of entries) {
    if (JSON.stringify(entry) === follow.after) break;
    newer.push(entry);
  }
  return follow.ids.every((d) => newer.some((a) => a.distribution_id === d && a.result !== "failed"));
}

async function detailView(id, follow) {
  if (!follow) show(el("p", { className: "muted" }, t("loading")));
  let row, log, minutes, dead;
  try {
    [row, log, minutes, dead] = await Promise.all([
      api("GET", `/console/subscriptions/${encodeURIComponent(state.account)}/${id}`),
      api("GET", `/api/v3/herald/deliveries/${id}`),
      api("GET", `/api/v3/herald/deliveries/${id}/minutes`),
      api("GET", `/api/v3/herald/dead_letters/${id}`),
    ]);
  } catch (err) { show(el("a", { href: "#/" }, t("back")), alertBox(err)); return; }
  const replay = async (ids) => {
    try {
      const answer = await api("POST", `/api/v3/herald/dead_letters/${id}/replay`, ids ? { distribution_ids: ids } : {});
      notice(t("replayed", answer.replayed));
      detailView(id, {
        ids: ids || dead.info.map((d) => d.distribution_id),
        after: log.info.length ? JSON.stringify(log.info[0]) : null,
        until: Date.now() + REPLAY_FOLLOW_MS,
      });
    } catch (err) { notice(err.message); }
  };
  const remove = async () => {
    if (!confirm(t("confirmDelete", row.subscription_name))) return;
    try {
      await api("DELETE", `/api/v3/event/subscribe/${encodeURIComponent(state.account)}/${row.bk_biz_id}/${id}`, {});
      notice(t("deleted"));
      location.hash = "#/";
    } catch (err) { notice(err.message); }
  };
  const success = rate(row);
  const facts = el("dl", { className: "facts" },
    ...[["id", row.subscription_id], ["name", row.subscription_name], ["system", row.system_name], ["events", row.subscription_form],
      ["callback", row.callback_url], ["namespace", `${row.namespace}/${row.name}`], ["operator", row.operator || "–"],
      ["total", row.statistics.total], ["failure", row.statistics.failure], ["successRate", success === null ? "–" : `${success.toFixed(1)}%`],
      ["pending", row.pending], ["deadLetters", row.dead_lettered], ["lastDelivery", row.last_delivery || "–"], ["lastError", row.last_error || "–"]]
      .flatMap(([k, v]) => [el("dt", {}, t(k)), el("dd", { id: `fact-${k}` }, v)]));
  const conditions = el("table", { id: "conditions" },
    el("thead", {}, el("tr", {}, ["type", "status", "reason", "message"].map((k) => el("th", { scope: "col" }, t(k))))),
    el("tbody", {}, row.conditions.map((c) => el("tr", {}, el("td", {}, c.type), el("td", { className: c.status === "True" ? "ok" : "bad" }, c.status), el("td", {}, c.reason), el("td", { className: "wrap" }, c.message)))));
  const logTable = log.info.length ? el("table", { id: "delivery-log" },
    el("thead", {}, el("tr", {}, ["time", "distributionId", "attempt", "result", "httpStatus", "latency", "error", "answer"].map((k) => el("th", { scope: "col" }, t(k))))),
    el("tbody", {}, log.info.map((a) => el("tr", { className: `attempt-${a.result}` },
      el("td", {}, a.time), el("td", { className: "num" }, a.distribution_id), el("td", { className: "num" }, a.attempt),
      el("td", { className: a.result === "delivered" ? "ok" : "bad" }, t(a.result)),
      el("td", { className: "num" }, a.http_status === null ? "–" : a.http_status), el("td", { className: "num" }, a.latency_ms === null ? "–" : `${a.latency_ms} ms`),
      el("td", { className: "wrap" }, a.error || "–"), el("td", { className: "wrap" }, a.answer || "–")))))
    : el("p", { className: "empty" }, t("noAttempts"));
  const deadTable = dead.info.length ? el("div", {},
    el("button", { type: "button", id: "replay-all", onclick: () => replay(null) }, t("replayAll")),
    el("table", { id: "dead-letters" },
      el("thead", {}, el("tr", {}, ["distributionId", "attempt", "reason", "error", "deadAt", "event", ""].map((k) => el("th", { scope: "col" }, k ? t(k) : "")))),
      el("tbody", {}, dead.info.map((d) => el("tr", {},
        el("td", { className: "num" }, d.distribution_id), el("td", { className: "num" }, d.attempts), el("td", {}, d.reason),
        el("td", { className: "wrap" }, d.error), el("td", {}, d.dead_at), el("td", { className: "wrap" }, JSON.stringify(d.event)),
        el("td", {}, el("button", { type: "button", className: "secondary", onclick: () => replay([d.distribution_id]) }, t("replay"))))))))
    : el("p", { className: "empty" }, t("noDeadLetters"));
  show(
    el("div", { className: "row" }, el("a", { href: "#/" }, t("back"))),
    el("section", { className: "card" }, el("h2", {}, `${t("detail")} #${row.subscription_id} ${row.subscription_name}`), facts,
      el("div", { className: "row" },
        el("button", { type: "button", className: "secondary", id: "edit", onclick: () => { location.hash = `#/edit/${id}`; } }, t("edit")),
        el("button", { type: "button", className: "danger", id: "delete", onclick: remove }, t("remove")))),
    el("section", { className: "card" }, el("h3", {}, t("conditions")), el("div", { className: "table-wrap" }, conditions)),
    el("section", { className: "card", id: "chart-section" }, el("h3", {}, t("chart")), chart(minutes.info),
      el("div", { className: "legend" }, el("span", { className: "attempts" }, t("attempts")), el("span", { className: "failures" }, t("failures")))),
    el("section", { className: "card", id: "log-section" }, el("h3", {}, t("deliveryLog")), el("div", { className: "table-wrap" }, logTable)),
    el("section", { className: "card", id: "dead-section" }, el("h3", {}, t("deadLetters")), el("div", { className: "table-wrap" }, deadTable)));
  if (follow && !replaySettled(log.info, follow) && Date.now() < follow.until) {
    const here = location.hash;
    setTimeout(() => { if (location.hash === here) detailView(id, follow); }, 1000);
  }
}

// Routing -------------------------------------------------------------------------------

function route() {
  if (!state.user) { signInView(); return; }
  const [, view, raw] = (location.hash || "#/").split("/");
  // Subscription ids are numbers; anything else in the address is not one.
  const id = /^\d+$/.test(raw || "") ? raw : null;
  if (view === "new") formView(null);
  else if (view === "edit" && id) formView(id);
  else if (view === "subscription" && id) detailView(id);
  else listView();
}

async function start() {
  document.getElementById("lang").addEventListener("change", (e) => {
    state.lang = e.target.value;
    localStorage.setItem("herald.lang", state.lang);
    document.getElementById("notice").textContent = "";
    route();
  });
  document.getElementById("sign-out").addEventListener("click", async () => {
    try { await api("DELETE", "/console/session", {}); } catch (err) { notice(err.message); }
    Object.assign(state, { user: null, csrf: null });
    location.hash = "#/";
    route();
  });
  window.addEventListener("hashchange", route);
  try {
    const session = await api("GET", "/console/session");
    Object.assign(state, { user: session.user, csrf: session.csrf });
  } catch (err) {
    notice(err.message);
  }
  route();
}

start();
