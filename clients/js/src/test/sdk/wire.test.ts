// The SDK's wire types against protocol/asyncapi.yaml: same payloads, same property
// names, same enums. A field added to the contract fails here until the SDK has it.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { parse } from "yaml";

import { WIRE_ENUMS, WIRE_FIELDS } from "../../sdk/index.js";
import { REPO } from "../stack.js";

interface Schema {
  title?: string;
  properties?: Record<string, Schema>;
  enum?: string[];
  anyOf?: Schema[];
  oneOf?: Schema[];
  items?: Schema;
}

const doc = parse(readFileSync(join(REPO, "protocol", "asyncapi.yaml"), "utf8")) as {
  components: { schemas: Record<string, Schema> };
};
const schemas = doc.components.schemas;

test("every payload type has exactly the schema's properties", () => {
  for (const [name, fields] of Object.entries(WIRE_FIELDS)) {
    const schema = schemas[name];
    assert.ok(schema?.properties, `asyncapi.yaml has no schema ${name}`);
    assert.deepEqual([...fields].sort(), Object.keys(schema.properties).sort(), name);
  }
});

test("every payload schema of the contract has a type in the SDK", () => {
  const payloads = Object.keys(schemas).filter((name) => schemas[name]?.properties);
  assert.deepEqual(payloads.sort(), Object.keys(WIRE_FIELDS).sort());
});

function enumsIn(schema: Schema, found: Map<string, string[]>): void {
  if (schema.enum && schema.title) found.set(schema.title, schema.enum);
  for (const child of [
    ...Object.values(schema.properties ?? {}),
    ...(schema.anyOf ?? []),
    ...(schema.oneOf ?? []),
    ...(schema.items ? [schema.items] : []),
  ]) {
    enumsIn(child, found);
  }
}

test("the enums are the schema's", () => {
  const found = new Map<string, string[]>();
  for (const schema of Object.values(schemas)) enumsIn(schema, found);
  for (const [title, values] of Object.entries(WIRE_ENUMS)) {
    assert.deepEqual([...values].sort(), [...(found.get(title) ?? [])].sort(), title);
  }
});
