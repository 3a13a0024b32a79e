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
 * so the ACL-check callback (MOSQ_EVT_ACL_CHECK) refuses a retained write (a publish or
 * a last will, which mosquitto checks at CONNECT and refuses with "not authorised")
 * from any account not in exempt_users with MOSQ_ERR_ACL_DENIED, and defers everything
 * else to dynsec. ACL checks go through the plugins in the same order as above (src/
 * plugin.c, acl__check_single), and the first answer other than "defer" decides, so a
 * deny here wins over dynsec's allow (tests/test_retain.py proves it).
 */

#include <stdlib.h>
#include <string.h>

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
	return MOSQ_ERR_PLUGIN_DEFER;
}

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
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %d exempt user(s)", exempt.count);
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	free_exempt_users();
	return MOSQ_ERR_SUCCESS;
}
