/*
 * mqchat_clientid_bind: a mosquitto 2.0 plugin (API v5) that binds MQTT client ids to
 * usernames, so that one signed-in user cannot present another user's client id and
 * take over that user's persistent session and its queued messages (with dynsec
 * alone, mosquitto 2.0.11 lets any authenticated user do so).
 *
 * The rule: a client id is either the username itself or starts with "<username>:".
 * mqchat usernames cannot contain ':', so "alice:phone" can only ever be alice's.
 * Accounts named in plugin_opt_exempt_users (space-separated: the bridge, the admin)
 * may use any client id; they are ours, not the public's.
 *
 * How it combines with dynsec (mosquitto 2.0.11, src/security.c mosquitto_unpwd_check):
 * the basic-auth callbacks of all plugins run in the order the plugins are loaded
 * (the order of the `plugin` lines); the first one that answers anything other than
 * MOSQ_ERR_PLUGIN_DEFER decides. dynsec answers SUCCESS for a good password, so this
 * plugin must be listed BEFORE dynsec: it refuses a foreign client id with
 * MOSQ_ERR_AUTH (CONNACK "not authorised") and otherwise defers, leaving the password
 * to dynsec. mosquitto checks credentials before it looks for an existing session
 * with that client id (src/handle_connect.c, connect__on_authorised), so a refused
 * CONNECT touches no session.
 *
 * It also keeps users from retaining anything (protocol.acl.retain_allowed): presence is
 * retained by the bridge alone, and a retained uplink would be replayed to the bridge
 * whenever it subscribes again. dynsec's ACLs cannot say "publish, but not retained",
 * so the ACL-check callback (MOSQ_EVT_ACL_CHECK) refuses a retained write (a publish, or
 * a last will when it fires: mosquitto 2.0.11 asks no plugin about a will at CONNECT)
 * from any account not in exempt_users with MOSQ_ERR_ACL_DENIED, and defers everything
 * else to dynsec. ACL checks go through the plugins in the same order as above (src/
 * plugin.c, acl__check_single), and the first answer other than "defer" decides, so a
 * deny here wins over dynsec's allow (tests/test_retained.py proves it).
 *
 * The publish quota (the quota_* functions; broker/quota.py is its twin on the
 * embedded broker): each user has a publish bucket of plugin_opt_publish_burst
 * tokens (default 50) refilled at plugin_opt_publish_rate a second (default 100;
 * 0 turns the quota off). A publish takes a token; without one it is refused
 * (MOSQ_ERR_ACL_DENIED: mosquitto drops it and still PUBACKs a QoS 1 publish) and
 * takes a token from the user's patience bucket (same size and rate). Once
 * patience is empty too (the user kept sending over twice the rate) the client is
 * disconnected, at the next tick of the main loop, not inside the ACL check that
 * is still reading its packet. Buckets belong to the username, so reconnecting
 * refills nothing. Exempt users have no quota. A publish within quota is deferred
 * (MOSQ_ERR_PLUGIN_DEFER): dynsec still decides whether it is allowed at all.
 */

#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define PLUGIN_NAME "mqchat_clientid_bind"

struct exempt_list {
	char *buffer;  /* a copy of the option value, cut into words in place */
	char **names;
	int count;
};

static mosquitto_plugin_id_t *plugin_id;
static struct exempt_list exempt;

static int is_exempt(const char *username)
{
	for(int i = 0; i < exempt.count; i++){
		if(strcmp(exempt.names[i], username) == 0){
			return 1;
		}
	}
	return 0;
}

static int client_id_is_bound(const char *client_id, const char *username)
{
	size_t len = strlen(username);

	if(strncmp(client_id, username, len) != 0){
		return 0;
	}
	return client_id[len] == '\0' || client_id[len] == ':';
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *auth = event_data;
	const char *client_id = mosquitto_client_id(auth->client);

	(void)event;
	(void)userdata;

	/* No username: nothing to bind to; dynsec (allow_anonymous false) refuses it. */
	if(auth->username == NULL || is_exempt(auth->username)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(client_id != NULL && client_id_is_bound(client_id, auth->username)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": refused client id '%s' for user '%s': "
			"a client id must be '%s' or start with '%s:'",
			client_id ? client_id : "", auth->username, auth->username, auth->username);
	return MOSQ_ERR_AUTH;
}

/* -- the publish quota ------------------------------------------------------------ */

#define QUOTA_DEFAULT_RATE 100.0
#define QUOTA_DEFAULT_BURST 50
/* Client ids waiting to be disconnected at the next tick; more wait for their next publish. */
#define QUOTA_MAX_PENDING_KICKS 64

struct quota_user {
	char *username;
	double publishes;  /* tokens left */
	double patience;   /* refusals left before a disconnect */
	double updated;    /* seconds, CLOCK_MONOTONIC */
};

static double quota_rate = QUOTA_DEFAULT_RATE;
static double quota_burst = QUOTA_DEFAULT_BURST;
static void *quota_users;  /* a tsearch(3) tree of struct quota_user, by username */
static char *quota_kicks[QUOTA_MAX_PENDING_KICKS];
static int quota_kick_count;

static double quota_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int quota_compare(const void *a, const void *b)
{
	return strcmp(((const struct quota_user *)a)->username, ((const struct quota_user *)b)->username);
}

static struct quota_user *quota_user_of(const char *username)
{
	struct quota_user key = {.username = (char *)username};
	struct quota_user **found = tfind(&key, &quota_users, quota_compare);
	struct quota_user *user;

	if(found != NULL){
		return *found;
	}
	user = calloc(1, sizeof(*user));
	if(user == NULL || (user->username = strdup(username)) == NULL){
		free(user);
		return NULL;
	}
	user->publishes = quota_burst;
	user->patience = quota_burst;
	user->updated = quota_now();
	if(tsearch(user, &quota_users, quota_compare) == NULL){
		free(user->username);
		free(user);
		return NULL;
	}
	return user;
}

static void quota_refill(struct quota_user *user)
{
	double now = quota_now();
	double earned = (now - user->updated) * quota_rate;

	user->updated = now;
	user->publishes = user->publishes + earned < quota_burst ? user->publishes + earned : quota_burst;
	user->patience = user->patience + earned < quota_burst ? user->patience + earned : quota_burst;
}

static void quota_schedule_kick(const char *client_id)
{
	for(int i = 0; i < quota_kick_count; i++){
		if(strcmp(quota_kicks[i], client_id) == 0){
			return;
		}
	}
	if(quota_kick_count < QUOTA_MAX_PENDING_KICKS){
		quota_kicks[quota_kick_count] = strdup(client_id);
		if(quota_kicks[quota_kick_count] != NULL){
			quota_kick_count++;
		}
	}
}

/* Only new messages (".../up/msg") count: a device catching up acks every message it
 * gets, a backlog of hundreds at once, and acks, typing and presence have the bridge's
 * own cheap per-kind rates. */
static int quota_counts(const char *topic)
{
	static const char suffix[] = "/up/msg";
	size_t len = topic != NULL ? strlen(topic) : 0;

	return len >= sizeof(suffix) - 1 && strcmp(topic + len - (sizeof(suffix) - 1), suffix) == 0;
}

static int quota_check(const struct mosquitto_evt_acl_check *check)
{
	const char *username = mosquitto_client_username(check->client);
	const char *client_id = mosquitto_client_id(check->client);
	struct quota_user *user;

	if(check->access != MOSQ_ACL_WRITE || username == NULL || is_exempt(username)
			|| !quota_counts(check->topic)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	user = quota_user_of(username);
	if(user == NULL){
		return MOSQ_ERR_PLUGIN_DEFER;  /* out of memory: do not refuse honest clients */
	}
	quota_refill(user);
	if(user->publishes >= 1.0){
		user->publishes -= 1.0;
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(user->patience >= 1.0){
		user->patience -= 1.0;
	}else if(client_id != NULL){
		quota_schedule_kick(client_id);
	}
	return MOSQ_ERR_ACL_DENIED;
}

static int quota_on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;

	for(int i = 0; i < quota_kick_count; i++){
		if(mosquitto_kick_client_by_clientid(quota_kicks[i], true) == MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					PLUGIN_NAME ": disconnected '%s': over its publish quota", quota_kicks[i]);
		}
		free(quota_kicks[i]);
	}
	quota_kick_count = 0;
	return MOSQ_ERR_SUCCESS;
}

static int quota_parse_option(const char *key, const char *value)
{
	char *end;
	double number;

	if(strcmp(key, "publish_rate") != 0 && strcmp(key, "publish_burst") != 0){
		return MOSQ_ERR_SUCCESS;
	}
	number = strtod(value, &end);
	if(end == value || *end != '\0' || number < 0 || (number < 1 && strcmp(key, "publish_burst") == 0)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": plugin_opt_%s: not a number >= %s: '%s'",
				key, strcmp(key, "publish_burst") == 0 ? "1" : "0", value);
		return MOSQ_ERR_INVAL;
	}
	if(strcmp(key, "publish_rate") == 0){
		quota_rate = number;
	}else{
		quota_burst = number;
	}
	return MOSQ_ERR_SUCCESS;
}

static int quota_register(void)
{
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": publish quota %.0f/s, burst %.0f%s",
			quota_rate, quota_burst, quota_rate > 0 ? "" : " (off)");
	if(quota_rate <= 0){
		return MOSQ_ERR_SUCCESS;
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, quota_on_tick, NULL, NULL);
}

static void quota_cleanup(void)
{
	if(quota_rate > 0){
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, quota_on_tick, NULL);
	}
	for(int i = 0; i < quota_kick_count; i++){
		free(quota_kicks[i]);
	}
	quota_kick_count = 0;
	while(quota_users != NULL){
		struct quota_user *user = *(struct quota_user **)quota_users;

		tdelete(user, &quota_users, quota_compare);
		free(user->username);
		free(user);
	}
}

/* -- the ACL check: the retain rule, then the quota ------------------------------ */

static int retain_denied(const struct mosquitto_evt_acl_check *check)
{
	const char *username;

	if(check->access != MOSQ_ACL_WRITE || !check->retain){
		return 0;
	}
	username = mosquitto_client_username(check->client);
	if(username != NULL && is_exempt(username)){
		return 0;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": refused a retained publish on '%s' from user '%s': "
			"users may not retain", check->topic, username ? username : "");
	return 1;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *check = event_data;

	(void)event;
	(void)userdata;
	if(retain_denied(check)){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(quota_rate > 0){
		return quota_check(check);
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

/* -- plugin life ------------------------------------------------------------------- */

static int parse_exempt_users(const char *value)
{
	char *word;
	char *saveptr = NULL;

	exempt.buffer = strdup(value);
	/* n words need at most strlen/2+1 slots */
	exempt.names = calloc(strlen(value) / 2 + 1, sizeof(char *));
	if(exempt.buffer == NULL || exempt.names == NULL){
		return MOSQ_ERR_NOMEM;
	}
	for(word = strtok_r(exempt.buffer, " \t", &saveptr); word != NULL;
			word = strtok_r(NULL, " \t", &saveptr)){
		exempt.names[exempt.count++] = word;
	}
	return MOSQ_ERR_SUCCESS;
}

static void free_exempt_users(void)
{
	free(exempt.names);
	free(exempt.buffer);
	memset(&exempt, 0, sizeof(exempt));
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	int rc;

	(void)userdata;
	plugin_id = identifier;
	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "exempt_users") == 0){
			free_exempt_users();
			rc = parse_exempt_users(options[i].value);
			if(rc != MOSQ_ERR_SUCCESS){
				free_exempt_users();
				return rc;
			}
		}
		rc = quota_parse_option(options[i].key, options[i].value);
		if(rc != MOSQ_ERR_SUCCESS){
			return rc;
		}
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %d exempt user(s)", exempt.count);
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
	}
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
	}
	return quota_register();
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	quota_cleanup();
	free_exempt_users();
	return MOSQ_ERR_SUCCESS;
}
