"""Brokers: the embedded amqtt broker, and provisioning of the production mosquitto.

::

    account created/changed ──▶ store (argon2 hash, disabled)        (broker.provisioning)
                   └──▶ mosquitto: dynsec client + per-user role   (broker.mosquitto)
    device CONNECT ──▶ MqchatBroker gate: throttles, store.accounts, client id owner
                   ──▶ amqtt AccountAuth (what the gate admitted)  (broker.embedded)
    account disabled/deleted/new password ──▶ embedded: dropped at the next poll;
                                              mosquitto: dropped by dynsec
    PUBLISH/SUBSCRIBE ──▶ TopicAcl / dynsec role ──▶ protocol.acl rules
"""

#: In the embedded broker's log once every listener accepts connections: what
#: ``mqchat up`` waits for.
READY_LOG = "embedded broker listening on"
