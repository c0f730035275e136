// A real OpenID provider for tests/interop.rs: panva's oidc-provider (OpenID Certified), configured with the
// clients relay's flows need. It listens on a free loopback port and prints `listening PORT`.
// CERT: the PEM certificate whose key signs the private_key_jwt client's assertions. AT_TTL: access tokens'
// lifetime in seconds. Consent is given by the sign-in itself (devInteractions' login form, then its consent
// form), as a person would in a browser; tests/interop/user.py fills the forms.
import http from 'node:http';
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

// The provider's own warnings about its development defaults (in-memory storage, its sample keys and forms)
// are what this test wants; anything else on stderr is shown in the test's output.
const warn = console.warn;
console.warn = (...args) => {
  if (!String(args[0]).includes('oidc-provider WARNING')) warn(...args);
};

const pub = createPublicKey(readFileSync(process.env.CERT)).export({ format: 'jwk' });
const ttl = Number(process.env.AT_TTL || 3600);
const service = (id, auth, extra) => ({
  client_id: id,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: auth,
  scope: 'mail',
  ...extra,
});
const clients = [
  service('cc-post', 'client_secret_post', { client_secret: 'post-secret-0123456789' }),
  service('cc-basic', 'client_secret_basic', { client_secret: 'basic-secret-0123456789' }),
  service('cc-jwt', 'private_key_jwt', { jwks: { keys: [pub] } }),
  {
    client_id: 'dev',
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'none',
    scope: 'openid offline_access mail',
  },
  {
    client_id: 'web',
    client_secret: 'web-secret-0123456789',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    // A native app's loopback redirect: any port matches (RFC 8252 section 7.3).
    application_type: 'native',
    redirect_uris: ['http://127.0.0.1/'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'openid offline_access mail',
  },
];

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const provider = new Provider(`http://127.0.0.1:${port}`, {
    clients,
    scopes: ['openid', 'offline_access', 'mail'],
    features: {
      clientCredentials: { enabled: true },
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
      introspection: { enabled: true },
    },
    // Refresh tokens for both person-made grants, rotated at each use; a rotated one used again revokes the
    // grant (the provider's reuse detection).
    issueRefreshToken: async () => true,
    rotateRefreshToken: true,
    ttl: { AccessToken: ttl, ClientCredentials: ttl, DeviceCode: 600, RefreshToken: 86400 },
    cookies: { keys: ['interop-test-only'] },
  });
  provider.on('grant.error', (ctx, err) => console.log('grant.error', err.error));
  provider.on('grant.success', (ctx) => console.log('grant.success', ctx.oidc.params.grant_type));
  server.on('request', provider.callback());
  console.log(`listening ${port}`);
});
