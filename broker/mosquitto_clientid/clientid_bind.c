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
 *
 * MQTT credentials (the credential_* functions; core/credentials.py is the other
 * half): a password that starts with "mqc1." is a short-lived credential from the
 * history API's POST /v1/mqtt-credentials, never an account password (the password
 * policy refuses that prefix), so it is decided here and never reaches dynsec's
 * password hashing:
 *     mqc1.<expires>.<issued>.<generation>.<hex HMAC-SHA256>
 * over "mqc1\n<username>\n<client id>\n<expires>\n<issued>\n<generation>", keyed
 * with the contents of plugin_opt_credential_key_file (the API's
 * MQCHAT_API_MQTT_CREDENTIAL_SECRET). It is accepted (MOSQ_ERR_SUCCESS: dynsec is not
 * asked; its ACLs still apply to the username) when the HMAC matches (OpenSSL's HMAC,
 * compared in constant time), it has not expired, it was issued since this broker
 * started, and its generation is not below the one the API last announced for the
 * user; anything else with the prefix (forged, expired, malformed, over 128 bytes,
 * no key configured) gets MOSQ_ERR_AUTH at the cost of one HMAC at most.
 * Revocation: when an account's tokens are revoked (password change, disable,
 * delete) the history API publishes "revoke <username> <generation> <correlation>"
 * to $CONTROL/mqchat/v1 (exempt users only: the ACL check below allows exactly
 * them to write it and to read the answer); the plugin remembers the generation,
 * drops the user's connections and answers "revoked <username> <generation>
 * <correlation>" on $CONTROL/mqchat/v1/response. What it was told is kept in memory
 * only: a restarted broker refuses every credential issued before it started
 * instead, and devices fetch new ones.
 *
 * The sign-in throttle (the signin_* functions; the embedded broker's twin is
 * MQCHAT_BROKER_SIGN_INS_PER_USER in broker/config.py): every CONNECT that names a
 * username (exempt accounts aside) takes a token from two buckets of that username, one
 * of plugin_opt_sign_ins_per_minute tokens (default 30) refilled over a minute and one
 * of plugin_opt_sign_ins_per_hour (default 300) refilled over an hour; 0 turns the
 * throttle off. Without a token the CONNECT is refused before any password is checked,
 * right or wrong, so a guesser learns nothing and a client signing in over and over in
 * a loop costs the broker one table lookup per attempt. The plugin cannot make
 * mosquitto 2.0 answer CONNACK 3 ("server unavailable", the embedded broker's answer),
 * only "not authorised" (which the SDK and most clients take as wrong credentials, and
 * stop) or an error that closes the connection before any CONNACK: it uses the error,
 * and clients retry with their backoff as after any dropped connection. The buckets
 * live in a fixed table (SIGNIN_SLOTS entries, about 4 MiB of address space, touched as
 * used), hashed with a random key per start; a username that finds no slot takes the
 * least recently used of its probe window, whose debt is then forgotten (as the
 * embedded broker's throttle forgets its least recently used keys).
 */

#include <ctype.h>
#include <stdint.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

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

/* -- MQTT credentials ----------------------------------------------------------------- */

#define CREDENTIAL_PREFIX "mqc1."
#define CREDENTIAL_MAX_CHARS 128
#define CREDENTIAL_KEY_MAX 4096
#define CONTROL_TOPIC "$CONTROL/mqchat/v1"
#define CONTROL_RESPONSE_TOPIC "$CONTROL/mqchat/v1/response"

struct revocation {
	char *username;
	unsigned long long min_generation;
};

static unsigned char credential_key[CREDENTIAL_KEY_MAX];
static size_t credential_key_len;  /* 0: no key, every credential is refused */
static time_t started_at;
static void *revocations;  /* a tsearch(3) tree of struct revocation, by username */

static int revocation_compare(const void *a, const void *b)
{
	return strcmp(((const struct revocation *)a)->username, ((const struct revocation *)b)->username);
}

static unsigned long long min_generation_of(const char *username)
{
	struct revocation key = {.username = (char *)username};
	struct revocation **found = tfind(&key, &revocations, revocation_compare);

	return found != NULL ? (*found)->min_generation : 0;
}

static int revoke(const char *username, unsigned long long generation)
{
	struct revocation key = {.username = (char *)username};
	struct revocation **found = tfind(&key, &revocations, revocation_compare);
	struct revocation *entry;

	if(found != NULL){
		if((*found)->min_generation < generation){
			(*found)->min_generation = generation;
		}
		return MOSQ_ERR_SUCCESS;
	}
	entry = calloc(1, sizeof(*entry));
	if(entry == NULL || (entry->username = strdup(username)) == NULL){
		free(entry);
		return MOSQ_ERR_NOMEM;
	}
	entry->min_generation = generation;
	if(tsearch(entry, &revocations, revocation_compare) == NULL){
		free(entry->username);
		free(entry);
		return MOSQ_ERR_NOMEM;
	}
	return MOSQ_ERR_SUCCESS;
}

/* Reads 1 to max_digits ASCII digits at *p into *value; advances *p past them. */
static int read_number(const char **p, int max_digits, unsigned long long *value)
{
	int n = 0;

	*value = 0;
	while(**p >= '0' && **p <= '9'){
		if(++n > max_digits){
			return 0;
		}
		*value = *value * 10 + (unsigned long long)(**p - '0');
		(*p)++;
	}
	return n > 0;
}

/* Whether password is a credential for exactly this username and client id. */
static int credential_valid(const char *username, const char *client_id, const char *password)
{
	static const char hex[] = "0123456789abcdef";
	size_t len = strnlen(password, CREDENTIAL_MAX_CHARS + 1);
	const char *p = password + strlen(CREDENTIAL_PREFIX);
	const char *numbers;
	size_t numbers_len;
	unsigned long long expires, issued, generation;
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int mac_len = 0;
	char mac_hex[2 * EVP_MAX_MD_SIZE + 1];
	char *statement;
	size_t statement_len;
	int ok;

	if(credential_key_len == 0 || len > CREDENTIAL_MAX_CHARS || client_id == NULL){
		return 0;
	}
	numbers = p;
	if(!read_number(&p, 12, &expires) || *p++ != '.'
			|| !read_number(&p, 12, &issued) || *p++ != '.'
			|| !read_number(&p, 10, &generation) || *p != '.'){
		return 0;
	}
	numbers_len = (size_t)(p - numbers);  /* "<expires>.<issued>.<generation>" */
	p++;
	if(strlen(p) != 64){
		return 0;
	}
	for(int i = 0; i < 64; i++){
		if(!isdigit((unsigned char)p[i]) && !(p[i] >= 'a' && p[i] <= 'f')){
			return 0;
		}
	}
	/* "mqc1\n" username "\n" client_id "\n" the numbers with '\n' for '.' */
	statement_len = 5 + strlen(username) + 1 + strlen(client_id) + 1 + numbers_len;
	statement = malloc(statement_len + 1);
	if(statement == NULL){
		return 0;
	}
	snprintf(statement, statement_len + 1, "mqc1\n%s\n%s\n%.*s",
			username, client_id, (int)numbers_len, numbers);
	for(size_t i = statement_len - numbers_len; i < statement_len; i++){
		if(statement[i] == '.'){
			statement[i] = '\n';
		}
	}
	ok = HMAC(EVP_sha256(), credential_key, (int)credential_key_len,
			(const unsigned char *)statement, statement_len, mac, &mac_len) != NULL;
	free(statement);
	if(!ok || mac_len != 32){
		return 0;
	}
	for(unsigned int i = 0; i < mac_len; i++){
		mac_hex[2 * i] = hex[mac[i] >> 4];
		mac_hex[2 * i + 1] = hex[mac[i] & 0x0f];
	}
	if(CRYPTO_memcmp(mac_hex, p, 64) != 0){
		return 0;
	}
	if((time_t)expires <= time(NULL) || (time_t)issued < started_at){
		return 0;
	}
	return generation >= min_generation_of(username);
}

static int is_username(const char *text, size_t len)
{
	if(len < 2 || len > 32){
		return 0;
	}
	for(size_t i = 0; i < len; i++){
		char c = text[i];
		if(!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.')){
			return 0;
		}
	}
	return 1;
}

/* "revoke <username> <generation> <correlation>" from an exempt account (the API's admin). */
static int on_control(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *control = event_data;
	const char *sender = mosquitto_client_username(control->client);
	char payload[160];
	char username[33];
	char correlation[65];
	char answer[200];
	unsigned long long generation;
	int fields;

	(void)event;
	(void)userdata;
	if(sender == NULL || !is_exempt(sender) || control->payloadlen >= sizeof(payload)){
		return MOSQ_ERR_SUCCESS;
	}
	memcpy(payload, control->payload, control->payloadlen);
	payload[control->payloadlen] = '\0';
	fields = sscanf(payload, "revoke %32s %llu %64[0-9a-f]", username, &generation, correlation);
	if(fields != 3 || !is_username(username, strlen(username))){
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": unreadable command on " CONTROL_TOPIC);
		return MOSQ_ERR_SUCCESS;
	}
	if(revoke(username, generation) != MOSQ_ERR_SUCCESS){
		return MOSQ_ERR_NOMEM;
	}
	mosquitto_kick_client_by_username(username, false);
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": credentials of '%s' below generation %llu revoked", username, generation);
	snprintf(answer, sizeof(answer), "revoked %s %llu %s", username, generation, correlation);
	return mosquitto_broker_publish_copy(NULL, CONTROL_RESPONSE_TOPIC, (int)strlen(answer), answer,
			1, false, NULL);
}

/* Exempt accounts only may write the control topic and read its answers. */
static int control_acl(const struct mosquitto_evt_acl_check *check)
{
	const char *username = mosquitto_client_username(check->client);
	int exempt_user = username != NULL && is_exempt(username);

	if(strcmp(check->topic, CONTROL_TOPIC) == 0){
		return exempt_user && check->access == MOSQ_ACL_WRITE ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
	}
	if(strcmp(check->topic, CONTROL_RESPONSE_TOPIC) == 0){
		return exempt_user && check->access != MOSQ_ACL_WRITE ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int read_credential_key(const char *path)
{
	FILE *file = fopen(path, "rb");
	size_t len;

	if(file == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot open plugin_opt_credential_key_file '%s'", path);
		return MOSQ_ERR_INVAL;
	}
	len = fread(credential_key, 1, sizeof(credential_key), file);
	fclose(file);
	while(len > 0 && isspace(credential_key[len - 1])){
		len--;
	}
	if(len == 0 || len == sizeof(credential_key)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				PLUGIN_NAME ": plugin_opt_credential_key_file '%s' must hold 1 to %d bytes",
				path, CREDENTIAL_KEY_MAX - 1);
		return MOSQ_ERR_INVAL;
	}
	credential_key_len = len;
	return MOSQ_ERR_SUCCESS;
}

static void credential_cleanup(void)
{
	OPENSSL_cleanse(credential_key, sizeof(credential_key));
	credential_key_len = 0;
	while(revocations != NULL){
		struct revocation *entry = *(struct revocation **)revocations;

		tdelete(entry, &revocations, revocation_compare);
		free(entry->username);
		free(entry);
	}
}

/* -- the sign-in throttle ---------------------------------------------------------- */

#define SIGNIN_DEFAULT_PER_MINUTE 30.0
#define SIGNIN_DEFAULT_PER_HOUR 300.0
#define SIGNIN_SLOTS 65536  /* a power of two */
#define SIGNIN_PROBES 8

struct signin_slot {
	char username[33];  /* "": free */
	unsigned char refused;  /* refusing since the last admission (logged once) */
	double minute;  /* tokens left in the per-minute bucket */
	double hour;
	double updated;  /* seconds, CLOCK_MONOTONIC */
};

static double signin_per_minute = SIGNIN_DEFAULT_PER_MINUTE;
static double signin_per_hour = SIGNIN_DEFAULT_PER_HOUR;
static struct signin_slot *signin_slots;
static uint64_t signin_key;

/* Seconds on CLOCK_MONOTONIC: the buckets' clock (the throttle's and the quota's). */
static double monotonic_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* FNV-1a over the username from a random start per broker start, so which names share a
 * probe window differs from start to start and cannot be worked out beforehand. */
static size_t signin_hash(const char *username)
{
	uint64_t h = 14695981039346656037ULL ^ signin_key;

	for(const char *c = username; *c; c++){
		h = (h ^ (unsigned char)*c) * 1099511628211ULL;
	}
	return (size_t)(h ^ (h >> 32));
}

static void signin_refill(struct signin_slot *slot, double now)
{
	double elapsed = now - slot->updated;

	slot->minute += elapsed * signin_per_minute / 60.0;
	if(slot->minute > signin_per_minute){
		slot->minute = signin_per_minute;
	}
	slot->hour += elapsed * signin_per_hour / 3600.0;
	if(slot->hour > signin_per_hour){
		slot->hour = signin_per_hour;
	}
	slot->updated = now;
}

/* Whether the slot's buckets are full by now: it remembers nothing a fresh one would not. */
static int signin_idle(const struct signin_slot *slot, double now)
{
	double elapsed = now - slot->updated;

	return slot->minute + elapsed * signin_per_minute / 60.0 >= signin_per_minute
			&& slot->hour + elapsed * signin_per_hour / 3600.0 >= signin_per_hour;
}

/* The username's slot: its own, else a free one, else an idle one, else the least
 * recently used of the probe window. */
static struct signin_slot *signin_slot_of(const char *username, double now)
{
	size_t start = signin_hash(username);
	struct signin_slot *spare = NULL;
	int spare_rank = 3;

	for(size_t i = 0; i < SIGNIN_PROBES; i++){
		struct signin_slot *slot = &signin_slots[(start + i) & (SIGNIN_SLOTS - 1)];
		int rank;

		if(slot->username[0] == '\0'){
			rank = 0;
		}else if(strcmp(slot->username, username) == 0){
			return slot;
		}else{
			rank = signin_idle(slot, now) ? 1 : 2;
		}
		if(rank < spare_rank || (rank == 2 && spare_rank == 2 && slot->updated < spare->updated)){
			spare = slot;
			spare_rank = rank;
		}
	}
	snprintf(spare->username, sizeof(spare->username), "%s", username);
	spare->refused = 0;
	spare->minute = signin_per_minute;
	spare->hour = signin_per_hour;
	spare->updated = now;
	return spare;
}

/* Whether this username may try to sign in now; takes its token if so. */
static int signin_allowed(const char *username)
{
	double now;
	struct signin_slot *slot;

	if(signin_slots == NULL || strlen(username) >= sizeof(slot->username)){
		return signin_slots == NULL;  /* off; a longer name is no mqchat username */
	}
	now = monotonic_now();
	slot = signin_slot_of(username, now);
	signin_refill(slot, now);
	if(slot->minute >= 1.0 && slot->hour >= 1.0){
		slot->minute -= 1.0;
		slot->hour -= 1.0;
		slot->refused = 0;
		return 1;
	}
	if(!slot->refused){
		slot->refused = 1;
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": refusing sign-ins of user '%s' for a while: over %.0f a minute "
				"or %.0f an hour", username, signin_per_minute, signin_per_hour);
	}
	return 0;
}

static int signin_start(void)
{
	if(signin_per_minute <= 0 || signin_per_hour <= 0){
		mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": sign-in throttle off");
		return MOSQ_ERR_SUCCESS;
	}
	if(RAND_bytes((unsigned char *)&signin_key, sizeof(signin_key)) != 1){
		return MOSQ_ERR_UNKNOWN;
	}
	signin_slots = calloc(SIGNIN_SLOTS, sizeof(*signin_slots));
	if(signin_slots == NULL){
		return MOSQ_ERR_NOMEM;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": sign-ins per user %.0f a minute, %.0f an hour",
			signin_per_minute, signin_per_hour);
	return MOSQ_ERR_SUCCESS;
}

static void signin_cleanup(void)
{
	free(signin_slots);
	signin_slots = NULL;
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
	if(!signin_allowed(auth->username)){
		/* Not MOSQ_ERR_AUTH: that is CONNACK 5, "wrong credentials". Any other error
		 * closes the connection before CONNACK: "try later". */
		return MOSQ_ERR_UNKNOWN;
	}
	if(client_id != NULL && client_id_is_bound(client_id, auth->username)){
		if(auth->password == NULL
				|| strncmp(auth->password, CREDENTIAL_PREFIX, strlen(CREDENTIAL_PREFIX)) != 0){
			return MOSQ_ERR_PLUGIN_DEFER;  /* an account password: dynsec checks it */
		}
		if(credential_valid(auth->username, client_id, auth->password)){
			return MOSQ_ERR_SUCCESS;
		}
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": refused a credential of user '%s' for client id '%s': "
				"forged, expired, revoked or for another client id", auth->username, client_id);
		return MOSQ_ERR_AUTH;
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
	user->updated = monotonic_now();
	if(tsearch(user, &quota_users, quota_compare) == NULL){
		free(user->username);
		free(user);
		return NULL;
	}
	return user;
}

static void quota_refill(struct quota_user *user)
{
	double now = monotonic_now();
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
	if(check->topic != NULL && strncmp(check->topic, "$CONTROL/mqchat/", 16) == 0){
		return control_acl(check);
	}
	if(retain_denied(check)){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(quota_rate > 0){
		return quota_check(check);
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

/* -- plugin life ------------------------------------------------------------------- */

/* The options that are numbers: each its smallest value and where it goes. */
static const struct {
	const char *key;
	double minimum;
	double *value;
} number_options[] = {
	{"publish_rate", 0, &quota_rate},
	{"publish_burst", 1, &quota_burst},
	{"sign_ins_per_minute", 0, &signin_per_minute},
	{"sign_ins_per_hour", 0, &signin_per_hour},
};

/* plugin_opt_<key> read into its variable if it is one of number_options; a value that
 * is not a number, or below the option's minimum, keeps the plugin from loading. */
static int parse_number_option(const char *key, const char *value)
{
	for(size_t i = 0; i < sizeof(number_options) / sizeof(number_options[0]); i++){
		char *end;
		double number;

		if(strcmp(key, number_options[i].key) != 0){
			continue;
		}
		number = strtod(value, &end);
		if(end == value || *end != '\0' || number < number_options[i].minimum){
			mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": plugin_opt_%s: not a number >= %g: '%s'",
					key, number_options[i].minimum, value);
			return MOSQ_ERR_INVAL;
		}
		*number_options[i].value = number;
	}
	return MOSQ_ERR_SUCCESS;
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
		if(strcmp(options[i].key, "credential_key_file") == 0){
			rc = read_credential_key(options[i].value);
			if(rc != MOSQ_ERR_SUCCESS){
				return rc;
			}
		}
		rc = parse_number_option(options[i].key, options[i].value);
		if(rc != MOSQ_ERR_SUCCESS){
			return rc;
		}
	}
	rc = signin_start();
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
	}
	started_at = time(NULL);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": MQTT credentials %s",
			credential_key_len > 0 ? "accepted" : "refused (no plugin_opt_credential_key_file)");
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
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
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
	quota_cleanup();
	signin_cleanup();
	credential_cleanup();
	free_exempt_users();
	return MOSQ_ERR_SUCCESS;
}
