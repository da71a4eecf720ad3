// A Node backend calling Roster with @grpc/grpc-js and @grpc/proto-loader (protos loaded at
// run time from proto/). Run by tests/polyglot/run (ROSTER_ADDR, ROSTER_API_KEY set). Exits
// non-zero with a message on the first thing that is not as the API promises.
'use strict';
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const protoDir = path.join(__dirname, '..', '..', '..', 'proto');
const def = protoLoader.loadSync('roster/v1/user.proto', {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const roster = grpc.loadPackageDefinition(def).roster.v1;

// google.rpc.Status and BadRequest, as far as this client reads them (Any's wire shape).
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Detail { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Detail details = 3; }
  message FieldViolation { string field = 1; string description = 2; }
  message BadRequest { repeated FieldViolation field_violations = 1; }
  message ResourceInfo {
    string resource_type = 1; string resource_name = 2; string owner = 3; string description = 4;
  }
`, { keepCase: true }).root;

// The README's service config ("Retrying calls"): grpc-js retries UNAVAILABLE by itself.
const serviceConfig = {
  methodConfig: [{
    name: ['UserService', 'AuthenticatorService', 'IdentityService', 'LogService']
      .map((s) => ({ service: `roster.v1.${s}` })),
    retryPolicy: {
      maxAttempts: 4, initialBackoff: '0.2s', maxBackoff: '5s', backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'],
    },
  }],
};

function check(cond, what) {
  if (!cond) {
    console.error(`node scenario: ${what}`);
    process.exit(1);
  }
}

const users = new roster.UserService(process.env.ROSTER_ADDR, grpc.credentials.createInsecure(),
  { 'grpc.service_config': JSON.stringify(serviceConfig) });
const meta = new grpc.Metadata();
meta.add('authorization', `Bearer ${process.env.ROSTER_API_KEY}`);
const call = (method, req) =>
  new Promise((resolve, reject) =>
    users[method](req, meta, (err, res) => (err ? reject(err) : resolve(res))));

async function main() {
  const tag = crypto.randomBytes(4).toString('hex');
  const made = [];
  for (let i = 0; i < 5; i++) {
    const r = await call('CreateUser', {
      user: { email: `js${i}.${tag}@example.com`, given_name: 'Js', external_id: `js-${tag}-${i}` },
    });
    made.push(r.user);
  }
  const found = (await call('LookupUser', { email: `JS0.${tag}@EXAMPLE.COM` })).user;
  check(found.id === made[0].id, 'LookupUser by email finds the user');

  const updated = (await call('UpdateUser', {
    user: { id: found.id, display_name: 'Node Person' },
    update_mask: { paths: ['display_name'] },
    etag: found.etag,
  })).user;
  check(updated.display_name === 'Node Person', 'UpdateUser sets the masked field');
  check(updated.given_name === 'Js', 'UpdateUser keeps fields outside the mask');
  check(updated.status === 'USER_STATUS_ACTIVE', `status is an enum name: ${updated.status}`);

  const seen = [];
  let token = '';
  do {
    const page = await call('ListUsers', {
      filter: `external_id:"js-${tag}-*"`, page_size: 2, page_token: token,
    });
    seen.push(...page.users.map((u) => u.id));
    token = page.next_page_token;
  } while (token);
  check(JSON.stringify(seen.sort()) === JSON.stringify(made.map((u) => u.id).sort()),
    `paging returns each user once: ${seen}`);

  try {
    await call('CreateUser', { user: { email: 'not an email', phone_number: '12' } });
    check(false, 'a bad CreateUser fails');
  } catch (e) {
    check(e.code === grpc.status.INVALID_ARGUMENT, `INVALID_ARGUMENT, got ${e.code}`);
    const [bin] = e.metadata.get('grpc-status-details-bin');
    check(bin, 'the error carries google.rpc.Status details');
    const status = rpc.lookupType('google.rpc.Status').decode(bin);
    const br = status.details.find((d) => d.type_url.endsWith('/google.rpc.BadRequest'));
    check(br, 'a BadRequest detail');
    const fields = rpc.lookupType('google.rpc.BadRequest').decode(br.value)
      .field_violations.map((v) => v.field).sort();
    check(JSON.stringify(fields) === '["user.email","user.phone_number"]', `violations: ${fields}`);
  }

  // A create whose answer was lost, sent again with the id it chose: ALREADY_EXISTS whose
  // ResourceInfo names that id, so the caller knows the first went through.
  const chosen = crypto.randomUUID();
  const again = { user: { email: `retry.${tag}@example.com` }, user_id: chosen };
  await call('CreateUser', again);
  try {
    await call('CreateUser', again);
    check(false, 'a create sent again fails');
  } catch (e) {
    check(e.code === grpc.status.ALREADY_EXISTS, `ALREADY_EXISTS, got ${e.code}`);
    const [bin] = e.metadata.get('grpc-status-details-bin');
    const status = rpc.lookupType('google.rpc.Status').decode(bin);
    const ri = status.details.find((d) => d.type_url.endsWith('/google.rpc.ResourceInfo'));
    check(ri, 'a ResourceInfo detail');
    const holder = rpc.lookupType('google.rpc.ResourceInfo').decode(ri.value).resource_name;
    check(holder === chosen, `ResourceInfo names the chosen id: ${holder}`);
  }

  const exported = await new Promise((resolve, reject) => {
    const out = [];
    const stream = users.ExportUsers(
      { filter: `external_id:"js-${tag}-*"`, read_mask: { paths: ['email'] } }, meta);
    stream.on('data', (m) => out.push(m.user.email));
    stream.on('error', reject);
    stream.on('end', () => resolve(out));
  });
  check(exported.length === 5 && exported.every((e) => e.startsWith('js')), `export: ${exported}`);
  console.log('node scenario: ok');
}

main().catch((e) => check(false, e.stack || String(e)));
